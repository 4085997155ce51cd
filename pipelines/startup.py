"""Process start-up shared by every stage: join a Ray cluster or start a local one.

One rule for the local case: a Data → Train pipeline deadlocks when the trainer's workers hold
every logical CPU (the data tasks then wait forever), so a local Ray declares enough logical
CPUs for the stage's own needs plus two for data tasks, and never fewer than four. Ray does
not pin cores; logical CPUs only bound how much runs at once.
"""

from __future__ import annotations

import os

# Ray Train gives a worker group this long to start; a loaded 2-core machine needs more than
# Ray's default to import torch and DeepSpeed in every worker.
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
LOCAL_WORKER_START_TIMEOUT_S = "240"


def local_num_cpus(need: float = 0.0) -> int:
    """Logical CPUs for a local Ray that must run ``need`` CPUs of workers besides data tasks."""
    return max(int(need) + 2, os.cpu_count() or 1, 4)


def init_ray(need_cpus: float = 0.0, num_cpus: int | None = None) -> bool:
    """Join ``$RAY_ADDRESS`` (a cluster, ``ray job submit``) or start a local Ray; True when this
    call started Ray (the caller then shuts it down). An initialised Ray is left as it is."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return True
    os.environ.setdefault(WORKER_START_TIMEOUT_ENV, LOCAL_WORKER_START_TIMEOUT_S)
    ray.init(num_cpus=num_cpus or local_num_cpus(need_cpus), include_dashboard=False)
    return True


def require_local_gpus(num_gpus: float, key: str) -> None:
    """A one-line error instead of a job that waits forever: ``key`` asks for GPUs per actor but
    the local Ray has none (a joined cluster, ``$RAY_ADDRESS``, may add GPU nodes on demand)."""
    import ray

    if num_gpus > 0 and not os.environ.get("RAY_ADDRESS") and not ray.cluster_resources().get("GPU"):
        raise ValueError(f"{key} = {num_gpus:g} but this machine has no GPU; pass {key}=0 to run on CPU")


# What `make` exports for every command (Makefile): no hub access, no Ray token or telemetry, Ray
# and gloo on loopback. In-process programs that start a local Ray (world build, benchmarks) set
# them too, for a user who runs them without make; a value already set is kept.
LOCAL_ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_AUTH_MODE": "disabled",
                      "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def set_local_env_defaults() -> None:
    for key, value in LOCAL_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)

