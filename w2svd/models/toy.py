"""A small conditional denoiser for low-dimensional data (the toy benchmark's backbone).

Input ``x [B, D]`` (a tiny "video": frames × numbers, flattened), sigma ``[B]`` and a caption
embedding ``cond.text [B, E]``. Residual MLP blocks whose linears (``fc1``/``fc2``) are the LoRA
targets; the middle block's output is the discriminator's feature.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from w2svd.models.base import Cond, Denoiser

TOY_LORA_TARGETS = r".*blocks\.\d+\.(fc1|fc2)"


def timestep_embedding(t_B: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``t = 1000·sigma``: ``[B] → [B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t_B.device) / half)
    angles = t_B.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(h))))


class ToyDenoiser(Denoiser):
    guidance_embedded = False

    def __init__(self, data_dim: int, cond_dim: int, hidden: int = 256, depth: int = 4):
        super().__init__()
        self.data_dim, self.cond_dim = data_dim, cond_dim
        self.in_proj = nn.Linear(data_dim, hidden)
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cond_proj = nn.Linear(cond_dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, data_dim)
        self.feature_module = self.blocks[depth // 2]
        self.feature_dim = hidden
        self._hidden = hidden

    def forward(self, x: torch.Tensor, sigma_B: torch.Tensor, cond: Cond,
                guidance_B: torch.Tensor | None = None) -> torch.Tensor:
        t_emb = self.time_mlp(timestep_embedding(1000.0 * sigma_B, self._hidden))
        h = self.in_proj(x) + t_emb + self.cond_proj(cond.text)
        for block in self.blocks:
            h = block(h)
        return self.out_proj(self.out_norm(h))
