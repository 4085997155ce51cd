"""Random draws that are device-correct and, when asked, per-sample.

Every random number of the method goes through this module, for two reasons:

* device: CUDA's random functions reject a generator that lives on another device, and the
  generators of a run live on the CPU (their state is what a checkpoint stores, and a CPU
  stream gives the same numbers on every machine). So a draw happens on the generator's own
  device and is then moved to the device asked for: the same seed gives the same numbers on a
  CPU test and on a GPU worker;
* per-sample streams: ``generator`` may be a list with one generator per sample. Sample ``i``
  of the result is then drawn from ``generator[i]`` alone and the results are stacked, so a
  clip does not depend on which other clips share its batch (batched serving, evaluation).

``generator=None`` draws from torch's global generator on the target device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def _draw(fn: Callable[..., torch.Tensor], shape: Sequence[int], generator: Generators,
          device: torch.device | str | None, dtype: torch.dtype | None, **kwargs) -> torch.Tensor:
    shape = tuple(int(n) for n in shape)
    if generator is None:
        return fn(*kwargs.pop("args", ()), shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        out = fn(*kwargs.pop("args", ()), shape, generator=generator, device=generator.device, dtype=dtype)
    else:
        generators = list(generator)
        if not shape or len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} per-sample generators for a draw of shape {shape}: the first "
                             "dim must be the number of samples")
        args = kwargs.pop("args", ())
        out = torch.stack([fn(*args, shape[1:], generator=g, device=g.device, dtype=dtype) for g in generators])
    return out if device is None else out.to(device)


def randn(shape: Sequence[int], generator: Generators = None, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal draws of ``shape`` on ``device`` (see the module's docstring)."""
    return _draw(torch.randn, shape, generator, device, dtype)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """``randn`` with the shape, device and dtype of ``x``."""
    return randn(x.shape, generator, x.device, x.dtype)


def rand(shape: Sequence[int], generator: Generators = None, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uniform draws on [0, 1) of ``shape`` on ``device``."""
    return _draw(torch.rand, shape, generator, device, dtype)


def randint(high: int, shape: Sequence[int], generator: Generators = None,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Integers uniform on ``[0, high)`` of ``shape`` on ``device``."""
    return _draw(torch.randint, shape, generator, device, None, args=(int(high),))


def per_sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed: the per-sample streams of batched generation."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]
