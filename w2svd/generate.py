"""The one way to turn prompts into clips: evaluation, the registry's pyfunc, Serve and batch
generation all call ``GeneratorBundle.generate``.

    bundle = load_export_bundle("runs/r1/export")               # or s3://…, or the teacher:
    bundle = load_teacher_bundle("debug", steps=28)             # its N-step Euler sampler
    clips_BTHWC = bundle.generate(["a person talking"], seeds=[0])   # uint8 [B, T, H, W, 3]

A batch is sampled in one backbone call per step, and each clip is a function of its own seed
only: clip ``i`` draws its starting noise and every re-noise step from its own generator
(``w2svd.rng.per_sample_generators``), so batching speeds generation up without changing any
video. An image-to-video model takes one reference image per prompt (uint8 ``[H, W, 3]``),
resized and cropped to the requested size and encoded by the VAE into the first latent frame.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from w2svd import rng
from w2svd.config import Config, load_config
from w2svd.data import storage
from w2svd.data.buckets import clips_from_model_output, resize_and_crop, to_model_input
from w2svd.export import CONFIG_FILE, SamplerSettings, load_generator, sample_latents, sampler_settings_for
from w2svd.models.base import Cond
from w2svd.roles import View
from w2svd.schedule import student_sigmas


@dataclass
class GeneratorBundle:
    """A generator ready to sample: backbone, sampler settings, text encoders and VAE
    (``encoders``, a ``w2svd.models.encoders.LatentEncoder``) and the export's config."""

    backbone: torch.nn.Module
    settings: SamplerSettings
    cfg: Config
    encoders: object
    source: str

    @property
    def fps(self) -> float:
        return float(self.cfg.data.fps)

    @property
    def image_to_video(self) -> bool:
        return bool(getattr(self.backbone, "image_conditioned", False))

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def with_steps(self, steps: int) -> GeneratorBundle:
        """The same generator sampled at ``steps`` steps (the shifted sigmas of that count): the
        teacher's N-step Euler baselines, a consistency (LCM) student at another step count."""
        sigmas = [float(x) for x in student_sigmas(int(steps), self.settings.shift)]
        return replace(self, settings=replace(self.settings, steps=int(steps), sigmas=sigmas),
                       source=f"{self.source}@{int(steps)}")

    def default_size(self) -> tuple[int, int, int]:
        b = self.cfg.data.buckets[0]
        return b.frames, b.height, b.width

    def sizes(self) -> list[tuple[int, int, int]]:
        """The (frames, height, width) buckets the generator was trained on."""
        return [(b.frames, b.height, b.width) for b in self.cfg.data.buckets]

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        patch = int(self.cfg.model.arch.patch_size) * self.encoders.spatial_ratio
        if num_frames < 1 or (num_frames - 1) % self.encoders.temporal_ratio:
            raise ValueError(f"num_frames = {num_frames} must be {self.encoders.temporal_ratio}k+1")
        if height < patch or width < patch or height % patch or width % patch:
            raise ValueError(f"size {height}x{width} must be positive multiples of {patch} for this generator")

    def encode_prompts(self, prompts: list[str], images: list[np.ndarray] | None, height: int,
                       width: int) -> Cond:
        text, mask, pooled = self.encoders.encode_text(list(prompts))
        cond = Cond(text=text, text_mask=mask.to(text.dtype), pooled=pooled)
        if self.image_to_video:
            if images is None or any(im is None for im in images):
                raise ValueError("this image-to-video generator needs a reference image for every prompt")
            frames_BCTHW = torch.stack([to_model_input(resize_and_crop(np.asarray(im)[None], height, width))
                                        for im in images])
            cond.image = self.encoders.encode_video(frames_BCTHW).to(text.dtype)
        elif images is not None and any(im is not None for im in images):
            raise ValueError("this generator is text-to-video and takes no reference image")
        return cond

    def _lap(self, timings: dict | None, key: str, start: float) -> float:
        """Add the seconds since ``start`` to ``timings[key]`` (waiting for the GPU first, or its
        queued kernels would be billed to the next phase); returns now."""
        if timings is None:
            return start
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        timings[key] = timings.get(key, 0.0) + now - start
        return now

    @torch.no_grad()
    def generate_latents(self, prompts: list[str], seeds: list[int], num_frames: int, height: int, width: int,
                         images: list[np.ndarray] | None = None, timings: dict | None = None) -> torch.Tensor:
        """Latents ``[B, C, T', h, w]``, one backbone call per sampler step for the whole batch.
        ``timings`` (a dict) receives the seconds of conditioning (``encode_s``: text encoders, and
        the VAE for a reference image) and of the sampler's backbone steps (``transformer_s``)."""
        if len(seeds) != len(prompts) or (images is not None and len(images) != len(prompts)):
            raise ValueError("give one seed (and, for image-to-video, one image) per prompt")
        self.check_size(num_frames, height, width)
        start = time.perf_counter()
        cond = self.encode_prompts(prompts, images, height, width).to(self.device)
        start = self._lap(timings, "encode_s", start)
        generators = rng.per_sample_generators(seeds)
        shape = (len(prompts), *self.encoders.latent_shape(num_frames, height, width))
        noise = rng.randn(shape, generators, self.device)
        latents = sample_latents(View(self.backbone), self.settings, cond, noise, generators)
        self._lap(timings, "transformer_s", start)
        return latents

    @torch.no_grad()
    def decode(self, latents_BCTHW: torch.Tensor, timings: dict | None = None) -> torch.Tensor:
        """Latents → uint8 clips ``[B, T, H, W, 3]`` (``timings["decode_s"]``: the VAE decoder)."""
        start = time.perf_counter()
        clips = clips_from_model_output(self.encoders.decode_latents(latents_BCTHW))
        self._lap(timings, "decode_s", start)
        return clips

    def generate(self, prompts: list[str], seeds: list[int] | None = None, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None,
                 images: list[np.ndarray] | None = None, timings: dict | None = None) -> torch.Tensor:
        """uint8 clips ``[B, T, H, W, 3]`` of ``prompts`` (seeds default to 0, 1, …; the size to
        the first training bucket). ``timings``: see ``generate_latents`` and ``decode``."""
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        f0, h0, w0 = self.default_size()
        seeds = list(range(len(prompts))) if seeds is None else [int(x) for x in seeds]
        latents = self.generate_latents(list(prompts), seeds, num_frames or f0, height or h0, width or w0, images,
                                        timings)
        return self.decode(latents, timings)


def _bundle(backbone, settings: SamplerSettings, cfg: Config, source: str, device: str | None) -> GeneratorBundle:
    from w2svd.models.encoders import LatentEncoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoders = LatentEncoder(cfg, device=str(device))
    if encoders.vae.config.latent_channels != settings.latent_channels:
        raise ValueError(f"{source}: the VAE of its config has {encoders.vae.config.latent_channels} latent "
                         f"channels, the generator {settings.latent_channels}")
    return GeneratorBundle(backbone.to(device), settings, cfg, encoders, source)


def load_export_bundle(folder: str | os.PathLike, device: str | None = None) -> GeneratorBundle:
    """A generator export folder (local or ``s3://``) → ``GeneratorBundle``."""
    backbone, settings = load_generator(folder, device=device)
    if storage.is_s3(str(folder)):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CONFIG_FILE
            path.write_bytes(storage.read_bytes(storage.join(str(folder), CONFIG_FILE)))
            cfg = load_config(str(path))
    else:
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a generator export: no {CONFIG_FILE}")
        cfg = load_config(str(path))
    return _bundle(backbone, settings, cfg, str(folder), device)


def load_teacher_bundle(teacher: str, steps: int, config: str = "debug", overrides: list[str] | tuple = (),
                        device: str | None = None) -> GeneratorBundle:
    """The teacher with its ``steps``-step Euler sampler: ``teacher`` is a transformer folder or
    export (used with ``config``'s encoders) or a config name whose ``model.teacher`` it takes
    (``null``: the tiny random weights of ``model.arch``)."""
    from w2svd.models.hunyuan import build_backbone

    overrides = [*overrides, f"method.teacher_steps={int(steps)}"]
    if Path(teacher).expanduser().is_dir() or storage.is_s3(teacher):
        cfg = load_config(config, [*overrides, f"model.teacher={teacher}"])
    else:
        cfg = load_config(teacher, overrides)
    backbone = build_backbone(cfg.model, device=device).eval().requires_grad_(False)
    bundle = _bundle(backbone, sampler_settings_for(cfg, role="teacher"), cfg, f"teacher:{teacher}", device)
    return bundle.with_steps(steps)
