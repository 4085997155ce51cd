"""Backbones: HunyuanVideo (T2V, I2V) adapters and the small denoiser of the toy benchmark."""

from w2svd.models.base import Cond, Denoiser, capture_features, count_parameter_bytes

__all__ = ["Cond", "Denoiser", "capture_features", "count_parameter_bytes"]

# HunyuanVideo pulls in diffusers (seconds to import); load it on first use so the toy
# benchmark and pure-math code stay light.
_HUNYUAN = ("HunyuanVideoBackbone", "build_backbone", "save_backbone")
__all__ += list(_HUNYUAN)


def __getattr__(name):
    if name in _HUNYUAN:
        from w2svd.models import hunyuan

        return getattr(hunyuan, name)
    raise AttributeError(f"module 'w2svd.models' has no attribute {name!r}")
