"""The machine a benchmark runs on: how it starts there, and how docs/benchmarks.md records it."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """``"N cores (CPU model)"``: the model name from /proc/cpuinfo where there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({cpu})"


def start_local(threads: int | None) -> None:
    """The local defaults every command starts with (``pipelines.startup``), and ``threads`` torch
    threads where given (a benchmark run beside another on the 2 cores)."""
    from pipelines.startup import set_local_env_defaults

    set_local_env_defaults()
    if threads:
        import torch

        torch.set_num_threads(threads)
