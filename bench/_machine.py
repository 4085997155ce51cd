"""The machine a benchmark ran on, in the words docs/benchmarks.md records it."""

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
