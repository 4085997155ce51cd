"""Collectives between training workers, on the device their process group needs.

NCCL (GPU workers) reduces only CUDA tensors and gloo (CPU workers) only CPU tensors, so a
number every rank must agree on (a loss for the health check, a parameter statistic) travels
through ``all_reduce`` here, which moves it to the backend's device and back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def backend_device(backend: str) -> torch.device:
    """Where tensors must live for a collective of ``backend``."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """The reduction of ``t`` over every rank (``t`` itself alone), on ``t``'s device."""
    if world()[1] == 1:
        return t
    out = t.to(backend_device(dist.get_backend()))
    dist.all_reduce(out, op=op)
    return out.to(t.device)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
