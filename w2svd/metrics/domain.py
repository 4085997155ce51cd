"""A small 3-D conv clip encoder trained by this project on synthetic portraits: the offline "domain FVD".

No public video feature network can be downloaded here, and I3D's Kinetics features say little about
small synthetic portrait clips anyway. :func:`train_domain_encoder` trains :class:`DomainVideoEncoder`
with two objectives that make its features see both motion and content:

* temporal order (self-supervised): classify each clip as original / time-reversed / frame-shuffled,
  which is only solvable from how the clip moves (blinks close fast and open slowly, mouths move);
* optionally, regression of known generative factors (:func:`factor_targets`: talking, blink rate,
  mouth opening, head motion, face size), standardised per factor.

The encoder (not the training heads) is saved as safetensors with its config in the header metadata;
:meth:`DomainVideoEncoder.from_path` loads it from a path or bucket URI. Domain-FVD numbers are only
comparable between runs that used the same saved encoder file (report its content hash).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from w2svd.config import EvalConfig
from w2svd.metrics.clips import to_float_BCTHW
from w2svd.metrics.weights import read_bytes, require_weights

DOMAIN_HOW_TO_GET = (
    "Train it with w2svd.metrics.domain.train_domain_encoder on synthetic portrait clips and save it "
    "with DomainVideoEncoder.save(path)."
)

# Order of the columns of factor_targets(); part of the saved encoder's meaning.
DOMAIN_TARGETS = (
    "talking",
    "blink_rate",
    "mouth_open_mean",
    "mouth_open_std",
    "head_x_std",
    "head_yaw_std",
    "face_size",
)


def factor_targets(factors: dict) -> torch.Tensor:
    """Known generative factors of one synthetic clip → ``[len(DOMAIN_TARGETS)]`` float targets."""
    T = max(int(factors["num_frames"]), 1)
    mouth = torch.as_tensor(factors["mouth_open"], dtype=torch.float32).reshape(-1)
    box = torch.as_tensor(factors["face_box"], dtype=torch.float32).reshape(-1, 4)
    side = float(min(factors["width"], factors["height"]))
    return torch.tensor([
        float(bool(factors["talking"])),
        len(factors["blink_frames"]) / T,
        float(mouth.mean()),
        float(mouth.std()) if mouth.numel() > 1 else 0.0,
        float(torch.as_tensor(factors["head_x"], dtype=torch.float32).std()) if T > 1 else 0.0,
        float(torch.as_tensor(factors["head_yaw"], dtype=torch.float32).std()) if T > 1 else 0.0,
        float((box[:, 2] * box[:, 3]).sqrt().mean()) / side,
    ])  # fmt: skip


class DomainVideoEncoder(nn.Module):
    """uint8 clips ``[B, T, H, W, 3]`` → features ``[B, num_features]``; resampled to ``frames × size²`` first."""

    def __init__(self, num_features: int = 64, width: int = 16, size: int = 64, frames: int = 16):
        super().__init__()
        self.config = {"num_features": num_features, "width": width, "size": size, "frames": frames}
        self.num_features, self.size, self.frames, self.name = num_features, size, frames, "domain"
        w = width
        chans = [
            (3, w, (1, 2, 2)),
            (w, 2 * w, (2, 2, 2)),
            (2 * w, 4 * w, (2, 2, 2)),
            (4 * w, 4 * w, (2, 2, 2)),
        ]
        layers = []
        for cin, cout, stride in chans:
            layers += [nn.Conv3d(cin, cout, 3, stride, padding=1), nn.GroupNorm(4, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(4 * w, num_features)

    def preprocess(self, clips_BTHWC) -> torch.Tensor:
        """uint8 clips → float ``[B, 3, frames, size, size]`` in [-1, 1] (trilinear resampling)."""
        x = to_float_BCTHW(clips_BTHWC)
        return F.interpolate(
            x, size=(self.frames, self.size, self.size), mode="trilinear", align_corners=False
        )

    def embed(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x_BCTHW).mean(dim=(2, 3, 4)))

    def forward(self, clips_BTHWC) -> torch.Tensor:
        return self.embed(self.preprocess(clips_BTHWC))

    def save(self, path: str | os.PathLike) -> str:
        """Write the encoder as safetensors (config in the metadata); returns its sha256 for reporting."""
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()},
            str(path),
            metadata={"config": json.dumps(self.config), "targets": json.dumps(DOMAIN_TARGETS)},
        )
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    @classmethod
    def from_path(cls, path_or_uri: str | os.PathLike | None) -> DomainVideoEncoder:
        from safetensors.torch import load

        path = require_weights(
            path_or_uri,
            "domain FVD (DomainVideoEncoder)",
            "a DomainVideoEncoder .safetensors file",
            DOMAIN_HOW_TO_GET,
        )
        data = read_bytes(path)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        enc = cls(**json.loads(header["__metadata__"]["config"]))
        enc.load_state_dict(load(data))
        return enc.eval()


def _order_task(x_BCTHW: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each clip kept (0), time-reversed (1) or frame-shuffled (2), with its label."""
    labels_B = torch.randint(0, 3, (x_BCTHW.shape[0],), generator=gen)
    out = x_BCTHW.clone()
    T = x_BCTHW.shape[2]
    for b, lab in enumerate(labels_B.tolist()):
        if lab == 1:
            out[b] = x_BCTHW[b].flip(1)
        elif lab == 2:
            out[b] = x_BCTHW[b][:, torch.randperm(T, generator=gen)]
    return out, labels_B


def train_domain_encoder(
    clips_BTHWC: torch.Tensor | Sequence,
    factors: Sequence[dict] | None = None,
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    **encoder_kwargs,
) -> tuple[DomainVideoEncoder, list[float]]:
    """Train a :class:`DomainVideoEncoder` on clips (plus their known factors, if given).

    ``clips_BTHWC`` is one uint8 batch ``[B, T, H, W, 3]`` or a list of clips ``[T, H, W, 3]`` of any sizes.

    Loss per step: ``CE(order_head(z), order_label) + [MSE(factor_head(z), standardised factor_targets)]``
    with ``z`` the encoder's features. Returns the encoder in eval mode and the loss per step.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = DomainVideoEncoder(**encoder_kwargs)
    # Clips of different sizes and lengths (the synthetic set mixes orientations) are resampled one by one.
    many = isinstance(clips_BTHWC, (list, tuple))
    x_all = torch.cat([enc.preprocess(c) for c in clips_BTHWC]) if many else enc.preprocess(clips_BTHWC)
    y_all = None
    if factors is not None:
        y_all = torch.stack([factor_targets(f) for f in factors])
        y_all = (y_all - y_all.mean(0)) / y_all.std(0).clamp_min(1e-6)
    order_head = nn.Linear(enc.num_features, 3)
    factor_head = nn.Linear(enc.num_features, len(DOMAIN_TARGETS))
    params = [*enc.parameters(), *order_head.parameters(), *factor_head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    losses = []
    enc.train()
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (min(batch_size, x_all.shape[0]),), generator=gen)
        x, labels = _order_task(x_all[idx], gen)
        z = enc.embed(x)
        loss = F.cross_entropy(order_head(z), labels)
        if y_all is not None:
            # Factor targets describe the clip as played forward; a reversed or shuffled clip keeps
            # its blink rate and mouth statistics, so the regression applies to every order label.
            loss = loss + F.mse_loss(factor_head(z), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return enc.eval(), losses


def ensure_domain_encoder(cfg: EvalConfig, cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """``(path_or_uri, sha256)`` of the domain encoder: the configured file, or one trained here on
    synthetic clips (deterministic for given settings, cached, reused by later evaluations)."""
    from w2svd.data.storage import cache_dir as default_cache
    from w2svd.evalset import domain_training_clips

    if cfg.domain_encoder:
        DomainVideoEncoder.from_path(cfg.domain_encoder)  # fails early, naming the missing file
        return cfg.domain_encoder, hashlib.sha256(read_bytes(cfg.domain_encoder)).hexdigest()
    recipe = {"clips": cfg.domain_train_clips, "steps": cfg.domain_train_steps, "features": cfg.domain_num_features,
              "factor_seed": cfg.factor_seed, "size": [cfg.num_frames, cfg.height, cfg.width, cfg.fps]}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache()) / "domain-encoders" / f"domain-{key}.safetensors"
    if not path.is_file():
        clips, factors = domain_training_clips(cfg)
        encoder, _ = train_domain_encoder(clips, factors, steps=cfg.domain_train_steps, batch_size=8,
                                          num_features=cfg.domain_num_features, width=8, size=32, frames=8)
        tmp = path.with_suffix(".partial")
        encoder.save(tmp)
        tmp.replace(path)  # a half-written file is never taken for a trained encoder
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()
