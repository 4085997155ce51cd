"""Backbones: HunyuanVideo (T2V, I2V) adapters and the small denoiser of the toy benchmark."""

from w2svd.models.base import Cond, Denoiser, capture_features, count_parameter_bytes

__all__ = ["Cond", "Denoiser", "capture_features", "count_parameter_bytes"]
