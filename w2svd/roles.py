"""The networks of one distillation worker, and the strengths they are evaluated at.

W2SVD keeps ONE frozen copy of the teacher ``B`` and a critic LoRA ``Δ`` on it:

    fake score  = B + α_strong·Δ        (trained: flow matching on generator samples)
    real score  = B + α_weak·Δ          (no gradient; the "weak" pull towards the fake)

Both are the same module evaluated under different adapter scales, so no weight is copied.
A role is a ``View``: a backbone plus the adapter scales it runs at. Scales are set by
``adapter_scales`` for the span of a block; a gradient-carrying pass must run its backward
inside the same block, because gradient checkpointing recomputes the forward during backward
with whatever scales are set then.

At rest every adapter has scale 0, so a bare call of the base is exactly the teacher.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from w2svd.losses import cfg_combine, gan_generator_loss
from w2svd.models.base import Cond, Denoiser, capture_features
from w2svd.schedule import x0_from_velocity

CRITIC = "critic"
GENERATOR = "generator"


# ---------------------------------------------------------------------------------------------
# LoRA adapters on a shared base


def lora_layers(module: nn.Module) -> list[LoraLayer]:
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def add_lora(module: nn.Module, name: str, rank: int, alpha: float, targets: str | list[str]) -> None:
    """Inject adapter ``name`` into ``module`` (in place), leave every adapter active at scale 0.

    PEFT activates only the newest adapter; the roles need all of them active, each switched
    on by its scale, so that two adapters on one base never require swapping modules.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    try:
        with warnings.catch_warnings():  # several adapters on one base is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, module, adapter_name=name)
    except ValueError as err:  # PEFT's message does not say which pattern
        raise ValueError(f"LoRA target pattern {targets!r} matched no layer of "
                         f"{type(module).__name__}: {err}") from err
    layers = lora_layers(module)
    for layer in layers:
        names = list(layer.scaling)
        layer.set_adapter(names)  # also marks every adapter's weights trainable
        for adapter in names:
            layer.set_scale(adapter, 0.0)


def adapter_parameters(module: nn.Module, name: str) -> list[nn.Parameter]:
    """The LoRA weights of adapter ``name`` (``lora_A.<name>`` / ``lora_B.<name>``)."""
    params = [p for n, p in module.named_parameters() if "lora_" in n and f".{name}." in f"{n}."]
    assert params, f"no parameters of adapter {name!r}"
    return params


@contextlib.contextmanager
def adapter_scales(layers: list[LoraLayer], scales: Mapping[str, float]) -> Iterator[None]:
    """Evaluate adapters at ``scales`` (multiples of their ``lora_alpha / r``) inside the block.

    An adapter at scale 0 is also deactivated for the block: it then costs nothing and its
    weights receive no gradient at all (not even zeros), so each step touches only its role.
    """
    saved = [(dict(layer.scaling), layer._active_adapter) for layer in layers]
    for layer in layers:
        for adapter, scale in scales.items():
            layer.set_scale(adapter, scale)
        # Assigned directly: PEFT's set_adapter would also flip requires_grad.
        current = _names(layer._active_adapter)
        layer._active_adapter = [a for a in layer.scaling
                                 if (scales[a] != 0.0 if a in scales else a in current)]
    try:
        yield
    finally:
        for layer, (scaling, active) in zip(layers, saved, strict=True):
            layer.scaling.update(scaling)
            layer._active_adapter = active


def _names(active: str | list[str]) -> list[str]:
    return [active] if isinstance(active, str) else list(active)


@dataclass
class View:
    """One role: a backbone evaluated at fixed adapter scales (empty for a plain module)."""

    backbone: Denoiser
    scales: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self._layers = lora_layers(self.backbone) if self.scales else []

    def scope(self) -> contextlib.AbstractContextManager:
        return adapter_scales(self._layers, self.scales) if self.scales else contextlib.nullcontext()

    def __call__(self, x, sigma_B, cond: Cond, guidance_B=None) -> torch.Tensor:
        with self.scope():
            return self.backbone(x, sigma_B, cond, guidance_B)


# ---------------------------------------------------------------------------------------------
# Discriminator head


class DiscriminatorHead(nn.Module):
    """A small head on the fake score's token features: ``[B, N, D]`` (or ``[B, D]``) → logits ``[B]``.

    Per-token logits averaged over tokens, so one head serves any video size.
    """

    def __init__(self, feature_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # The head keeps its own dtype (fp32 beside a bf16 backbone, unless DeepSpeed casts the
        # whole engine): features are cast to it, and the logits come back in fp32 for the loss.
        tokens_BND = features if features.dim() == 3 else features.unsqueeze(1)
        tokens_BND = tokens_BND.to(self.net[1].weight.dtype)
        return self.net(tokens_BND).mean(dim=(1, 2)).float()


# ---------------------------------------------------------------------------------------------
# Guidance


@dataclass(frozen=True)
class Guidance:
    """How the real score is guided: ``embedded`` (HunyuanVideo T2V), ``cfg``, or ``none``."""

    mode: str = "none"
    scale: float = 1.0
    fake_scale: float = 1.0

    @classmethod
    def from_config(cls, method_cfg) -> Guidance:
        return cls(method_cfg.guidance, method_cfg.guidance_scale, method_cfg.fake_guidance_scale)


def student_guidance(guidance: Guidance) -> tuple[str, float]:
    """The guidance a few-step student (W2SVD, DMD2 or LCM generator) runs at, in training,
    validation and serving alike: an embedded-guidance model keeps the teacher's guidance input
    at the real score's scale; a CFG model's student runs conditional only (one evaluation per
    step is the point of distillation)."""
    return (guidance.mode, guidance.scale) if guidance.mode == "embedded" else ("none", 1.0)


def guided_velocity(view: View, x, sigma_B, cond: Cond, mode: str, scale: float) -> torch.Tensor:
    """The velocity of ``view`` under guidance ``scale``.

    embedded: the guidance embedding receives ``scale·1000``;
    cfg:      ``uncond + w·(cond − uncond)``, both halves in one batched call;
    none:     the conditional prediction.
    """
    if mode == "embedded":
        return view(x, sigma_B, cond, torch.full_like(sigma_B, scale * 1000.0))
    if mode == "cfg" and scale != 1.0:
        v = view(torch.cat([x, x]), torch.cat([sigma_B, sigma_B]), Cond.cat([cond, cond.null()]))
        v_cond, v_uncond = v.chunk(2)
        return cfg_combine(v_uncond, v_cond, scale)
    return view(x, sigma_B, cond)


# ---------------------------------------------------------------------------------------------
# The roles of one worker


class Roles(nn.Module):
    """Generator, fake score, real score and discriminator head, built from one teacher.

    ``method``: "w2svd" (critic LoRA on the shared base; generator a full copy or a second
    LoRA) or "dmd2" (vanilla: separate full trainable fake copy, real = frozen teacher).
    Registered as an ``nn.Module`` so ``state_dict`` and ``.to`` cover every role once.
    """

    def __init__(self, base: Denoiser, generator: View, fake: View, real: View, teacher: View,
                 disc: DiscriminatorHead | None, guidance: Guidance, critic_params: list[nn.Parameter],
                 generator_params: list[nn.Parameter]):
        super().__init__()
        self.base = base
        # Distinct modules only: a full generator copy / DMD2 fake copy; LoRA roles live in base.
        self.extra = nn.ModuleDict(
            {name: v.backbone for name, v in (("generator", generator), ("fake", fake))
             if v.backbone is not base}
        )
        self.disc = disc
        self.generator, self.fake, self.real, self.teacher = generator, fake, real, teacher
        self.guidance = guidance
        self._critic_params = critic_params
        self._generator_params = generator_params

    # -- parameters --------------------------------------------------------------------------
    def critic_parameters(self) -> list[nn.Parameter]:
        """Trained by the critic step: the critic LoRA (or DMD2's fake copy) and the head."""
        return self.fake_score_parameters() + self.disc_parameters()

    def fake_score_parameters(self) -> list[nn.Parameter]:
        return list(self._critic_params)

    def disc_parameters(self) -> list[nn.Parameter]:
        return list(self.disc.parameters()) if self.disc is not None else []

    def generator_parameters(self) -> list[nn.Parameter]:
        return self._generator_params

    # -- evaluations -------------------------------------------------------------------------
    def generator_velocity(self, x, sigma_B, cond: Cond) -> torch.Tensor:
        return guided_velocity(self.generator, x, sigma_B, cond, *student_guidance(self.guidance))

    def generator_x0(self, x, sigma_B, cond: Cond) -> torch.Tensor:
        return x0_from_velocity(x, self.generator_velocity(x, sigma_B, cond), sigma_B)

    def real_x0(self, x_s, sigma_B, cond: Cond) -> torch.Tensor:
        v = guided_velocity(self.real, x_s, sigma_B, cond, self.guidance.mode, self.guidance.scale)
        return x0_from_velocity(x_s, v, sigma_B)

    def _fake_guidance(self) -> tuple[str, float]:
        g = self.guidance
        return (g.mode, g.fake_scale) if g.mode == "embedded" else ("none", 1.0)

    def fake_velocity_and_features(self, x_s, sigma_B, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        with capture_features(self.fake.backbone) as captured:
            v = guided_velocity(self.fake, x_s, sigma_B, cond, *self._fake_guidance())
        return v, captured[-1]

    def fake_x0(self, x_s, sigma_B, cond: Cond) -> torch.Tensor:
        v = guided_velocity(self.fake, x_s, sigma_B, cond, *self._fake_guidance())
        return x0_from_velocity(x_s, v, sigma_B)

    def gan_generator_grad(self, x_s, sigma_B, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        """``L = softplus(−D(features(x_s)))`` and ``∂L/∂x_s``, computed inside the fake scope.

        The generator then backpropagates the surrogate ``<∂L/∂x_s, x_s>`` through its own pass
        only: the gradient is the same, no critic weight receives any, and a checkpointed
        backbone never recomputes the fake pass at the generator's adapter scales.
        """
        x_leaf = x_s.detach().requires_grad_(True)
        with self.fake.scope():
            _, features = self.fake_velocity_and_features(x_leaf, sigma_B, cond)
            loss = gan_generator_loss(self.disc(features))
            (grad,) = torch.autograd.grad(loss, x_leaf)
        return loss.detach(), grad


def build_roles(teacher: Denoiser, *, method: str = "w2svd", generator: str = "full",
                alpha_weak: float = 0.25, alpha_strong: float = 1.0, lora_rank: int = 16,
                lora_alpha: float = 16.0, generator_lora_rank: int = 16, lora_targets: str | list[str],
                guidance: Guidance = Guidance(), discriminator: bool = True,
                disc_hidden: int = 256) -> Roles:
    """Wire the roles of DESIGN §2 around ``teacher`` (modified in place: frozen, adapters added)."""
    if method not in ("w2svd", "dmd2"):
        raise ValueError(f"method {method!r} has no distillation roles; choose 'w2svd' or 'dmd2'")
    if generator not in ("full", "lora"):
        raise ValueError(f"generator {generator!r}; choose 'full' or 'lora'")
    teacher.requires_grad_(False)
    teacher_view = View(teacher)

    def trainable_copy() -> Denoiser:
        return copy.deepcopy(teacher).requires_grad_(True)

    if method == "dmd2":
        if generator != "full":
            raise ValueError("vanilla DMD2 keeps full copies; generator='lora' needs method='w2svd'")
        gen, fake = View(trainable_copy()), View(trainable_copy())
        real = teacher_view
        critic_params = list(fake.backbone.parameters())
    else:
        gen_copy = trainable_copy() if generator == "full" else None  # before any adapter exists
        add_lora(teacher, CRITIC, lora_rank, lora_alpha, lora_targets)
        if generator == "lora":
            add_lora(teacher, GENERATOR, generator_lora_rank, generator_lora_rank, lora_targets)
            gen = View(teacher, {CRITIC: 0.0, GENERATOR: 1.0})
        else:
            gen = View(gen_copy)
        fake = View(teacher, {CRITIC: alpha_strong, GENERATOR: 0.0})
        real = View(teacher, {CRITIC: alpha_weak, GENERATOR: 0.0})
        # The teacher view must see no adapter even while another role's scope is open.
        teacher_view = View(teacher, {CRITIC: 0.0, GENERATOR: 0.0})
        critic_params = adapter_parameters(teacher, CRITIC)
    generator_params = (adapter_parameters(teacher, GENERATOR) if generator == "lora"
                        else list(gen.backbone.parameters()))
    disc = DiscriminatorHead(teacher.feature_dim, disc_hidden) if discriminator else None
    return Roles(teacher, gen, fake, real, teacher_view, disc, guidance, critic_params, generator_params)


def build_roles_from_config(teacher: Denoiser, method_cfg) -> Roles:
    """``build_roles`` with the values of a ``MethodConfig``."""
    m = method_cfg
    return build_roles(
        teacher, method=m.name, generator=m.generator, alpha_weak=m.alpha_weak,
        alpha_strong=m.alpha_strong, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
        generator_lora_rank=m.generator_lora_rank, lora_targets=m.lora_targets,
        guidance=Guidance.from_config(m),
        discriminator=m.lambda_gan_gen > 0 or m.lambda_gan_disc > 0,
    )
