"""Measured memory per worker: vanilla DMD2, W2SVD (full generator) and W2SVD shared-base.

    w2svd bench memory --out DIR [--sizes tiny,small,medium,large] [--workers 1,2] [--zero 2,3]
    python bench/memory.py --out DIR              # the same program

For every model size, method, ZeRO stage and worker count, real DeepSpeed engines are built
exactly as ``pipelines.distill`` builds them (``make_role_engines``, gloo, one process per
worker), a warm-up critic and generator update creates every lazily allocated buffer and the
Adam moments, and then the bytes each worker holds are read from the engines and tensors:

* parameters: distinct storages of every role's parameters after DeepSpeed wrapped them (a
  ZeRO-3 parameter counts its own shard, ``ds_tensor``);
* optimizer: the tensors of the optimizer DeepSpeed steps (its fp32 master partitions) and its
  state (Adam moments), less any storage already counted as a parameter;
* gradients: DeepSpeed's gradient partitions right after ``backward`` (ZeRO-2
  ``averaged_gradients``, ZeRO-3 ``grad_partitions_flat_buffer``);
* buckets: DeepSpeed's reduce buckets (``ipg_buckets``), a fixed size per engine;
* activations: the peak, during one critic step and one generator step (forward and backward),
  of the bytes allocated inside the step and freed before it ends, with and without gradient
  checkpointing. Every tensor a torch op creates is seen by a ``TorchDispatchMode`` and followed
  until its storage is freed (``AllocationTracker``), so this is what a CUDA caching allocator
  would report as allocated, on CPU. Storages that outlive the step are gradients and buckets,
  counted above.

``--probes`` adds the activation probe grid that ``w2svd/memory/activations.py``'s coefficients are fitted
to (single process, no DeepSpeed), and ``--fit`` prints the fitted coefficients. Every result
is compared with the planner (``w2svd.memory``); ``DIR/memory.json`` holds the raw numbers and
``DIR/memory.md`` the tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DeepSpeed's CPU op is compiled per torch build: a cache shared between environments is rebuilt.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from bench._machine import describe as describe_machine  # noqa: E402
from w2svd import memory  # noqa: E402
from w2svd.config import Config, load_config  # noqa: E402
from w2svd.data.buckets import latent_size  # noqa: E402

# Model sizes this 2-core, 24 GiB machine holds with DMD2's three copies on two workers: the
# debug config's tiny HunyuanVideo and three wider, deeper ones (same block types, same shapes
# of data: one 9 × 64 × 48 clip bucket, 16 text tokens, batch 2 per worker).
SIZES = {
    "tiny": [],
    "small": ["model.arch.num_attention_heads=4", "model.arch.attention_head_dim=32",
              "model.arch.rope_axes_dim=[8,8,16]", "model.arch.num_layers=2", "model.arch.num_single_layers=2",
              "method.lora_rank=8", "method.generator_lora_rank=8"],
    "medium": ["model.arch.num_attention_heads=8", "model.arch.attention_head_dim=32",
               "model.arch.rope_axes_dim=[8,8,16]", "model.arch.num_layers=4", "model.arch.num_single_layers=4",
               "model.arch.mlp_ratio=4.0", "method.lora_rank=16", "method.generator_lora_rank=16"],
    "large": ["model.arch.num_attention_heads=8", "model.arch.attention_head_dim=64",
              "model.arch.rope_axes_dim=[16,24,24]", "model.arch.num_layers=6", "model.arch.num_single_layers=6",
              "model.arch.mlp_ratio=4.0", "method.lora_rank=16", "method.generator_lora_rank=16"],
}
METHODS = memory.METHODS
ROPE_AXES = {8: [2, 2, 4], 16: [4, 4, 8], 32: [8, 8, 16], 64: [16, 24, 24]}  # sums to the head dim
ZERO_STAGES = (2, 3)


# ---------------------------------------------------------------------------------------------
# Reading bytes from tensors


class AllocationTracker(TorchDispatchMode):
    """Every storage a torch op allocates while active, followed until it is freed.

    An op's output is a new allocation unless its storage is one of the op's inputs (a view, an
    in-place op, a collective): parameters viewed inside a step are not allocations of the step.
    ``mark()`` / ``since(mark)`` split what a region allocated into what it freed again (its
    transient peak) and what outlived it (retained).
    """

    def __init__(self, ignore_numel: frozenset[int] = frozenset()):
        super().__init__()
        self._ignore = ignore_numel
        self._live: dict[int, tuple[int, int]] = {}  # storage data_ptr → (allocation id, bytes)
        self._events: list[tuple[int, int]] = []  # (allocation id, +bytes | -bytes)
        self._ids = itertools.count()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self._live and key not in inputs and t.numel() not in self._ignore:
                i = next(self._ids)
                self._live[key] = (i, nbytes)
                self._events.append((i, nbytes))
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        i, nbytes = self._live.pop(key, (None, 0))
        if i is not None:
            self._events.append((i, -nbytes))

    def mark(self) -> int:
        return len(self._events)

    def since(self, mark: int) -> tuple[int, int]:
        """(peak bytes of the allocations after ``mark`` that are freed again, bytes still held)."""
        alive = {i for i, _ in self._live.values()}
        events = self._events[mark:]
        new = {i for i, n in events if n > 0}
        retained = {i for i in new if i in alive}
        current = peak = 0
        for i, n in events:
            if i in new and i not in retained:
                current += n
                peak = max(peak, current)
        return peak, sum(n for i, n in events if i in retained and n > 0)


def distinct_bytes(tensors, exclude: set[int] = frozenset()) -> tuple[int, set[int]]:
    """Bytes of the distinct storages of ``tensors`` (not in ``exclude``), and their keys."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() and key not in seen and key not in exclude:
            seen.add(key)
            total += storage.nbytes()
    return total, seen


def parameter_storages(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for p in module.parameters() for t in (p, getattr(p, "ds_tensor", None)) if t is not None]


def optimizer_tensors(engine) -> list[torch.Tensor]:
    """What the optimizer DeepSpeed steps holds: ZeRO's fp32 master partitions and the state of
    the torch optimizer it wraps (Adam's moments and step counters)."""
    zero = engine.optimizer
    base = getattr(zero, "optimizer", zero)
    # ZeRO-3 hands its masters to the torch optimizer only for the duration of a step.
    tensors = [*getattr(zero, "single_partition_of_fp32_groups", []),  # ZeRO-1/2
               *getattr(zero, "fp32_partitioned_groups_flat", []),  # ZeRO-3
               *(p for group in base.param_groups for p in group["params"])]
    for state in base.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def gradient_tensors(engine) -> list[torch.Tensor]:
    """DeepSpeed's gradient partitions of this rank, as they are right after ``backward``."""
    zero = engine.optimizer
    flat = getattr(zero, "grad_partitions_flat_buffer", None)  # ZeRO-3
    if flat is not None:
        return [flat]
    grads = getattr(zero, "averaged_gradients", {})  # ZeRO-1/2
    return [t for v in grads.values() for t in (v if isinstance(v, (list, tuple)) else [v])]


def bucket_bytes(engine) -> tuple[int, bool]:
    """Bytes of one engine's reduce buckets, and whether they are held between steps: ZeRO-3
    allocates them once, ZeRO-2 at the start of every backward (``reduce_bucket_size`` elements
    of the gradient dtype per bucket), freeing them at its end."""
    zero = engine.optimizer
    buckets = getattr(zero, "ipg_buckets", {}) or {}
    held = []
    for bucket in buckets.values():
        held += bucket.buffer if isinstance(bucket.buffer, (list, tuple)) else [bucket.buffer]
    held = [t for t in held if isinstance(t, torch.Tensor)]
    if held:
        return distinct_bytes(held)[0], True
    element = torch.empty(0, dtype=next(iter(buckets), torch.float32)).element_size()
    return int(getattr(zero, "reduce_bucket_size", 0)) * element * max(1, len(buckets)), False


def set_gradient_checkpointing(module: torch.nn.Module, on: bool) -> None:
    from diffusers.models.modeling_utils import ModelMixin

    for m in module.modules():
        if isinstance(m, ModelMixin) and m._supports_gradient_checkpointing:
            m.enable_gradient_checkpointing() if on else m.disable_gradient_checkpointing()


def make_batch(cfg: Config, generator: torch.Generator):
    from w2svd.models.hunyuan import dummy_cond

    arch, bucket = cfg.model.arch, cfg.data.buckets[0]
    t, h, w = latent_size(bucket.frames, bucket.height, bucket.width)
    x = torch.randn(cfg.optim.batch_size, arch.out_channels, t, h, w, generator=generator)
    return x, dummy_cond(cfg.model, cfg.optim.batch_size, cfg.model.text_max_length, generator)


# ---------------------------------------------------------------------------------------------
# One worker of a DeepSpeed measurement


def measure_cell(cfg: Config) -> dict:
    """Bytes this rank holds for ``cfg``'s roles and engines (see the module docstring)."""
    from pipelines.engines import make_role_engines
    from w2svd.distill import StepSettings, critic_step, generator_step
    from w2svd.models.hunyuan import build_backbone
    from w2svd.roles import build_roles_from_config

    teacher = build_backbone(cfg.model)
    roles = build_roles_from_config(teacher, cfg.method)
    critic, generator = make_role_engines(roles, cfg)
    st = StepSettings.from_config(cfg.method)
    rng = torch.Generator().manual_seed(0)
    x, cond = make_batch(cfg, rng)
    engines = (critic.engine, generator.engine)
    # DeepSpeed's reduce buckets are reported on their own (``bucket_bytes``), not as activations.
    tracker = AllocationTracker(frozenset(int(getattr(e.optimizer, "reduce_bucket_size", -1)) for e in engines))
    out: dict = {}

    def update(name, step, engine, record: bool):
        with tracker:
            mark = tracker.mark()
            step(roles, x, cond, st, backward=engine.backward, generator=rng)
            peak, _ = tracker.since(mark)
        grads, _ = distinct_bytes(gradient_tensors(engine.engine))
        with tracker:
            mark = tracker.mark()
            engine.step()
            step_peak, _ = tracker.since(mark)
        if record:
            out[name] = {"activations": peak, "gradients": grads, "optimizer_step": step_peak}

    # Warm-up: every lazily allocated buffer and the Adam moments exist afterwards.
    update("critic", critic_step, critic, record=False)
    update("generator", generator_step, generator, record=False)
    params, param_keys = distinct_bytes(parameter_storages(roles))
    opt = sum(distinct_bytes(optimizer_tensors(e), param_keys)[0] for e in engines)
    # One backward runs at a time: held buckets add up, per-backward ones do not.
    held = [bucket_bytes(e) for e in engines]
    buckets = sum(b for b, kept in held if kept) + max((b for b, kept in held if not kept), default=0)
    state = {"parameters": params, "optimizer": opt, "buckets": buckets}
    for ckpt in (False, True):
        set_gradient_checkpointing(roles, ckpt)
        update("critic", critic_step, critic, record=True)
        update("generator", generator_step, generator, record=True)
        state[f"checkpointing={ckpt}"] = {k: out.pop(k) for k in ("critic", "generator")}
    state["gradients"] = {"critic": state["checkpointing=False"]["critic"]["gradients"],
                          "generator": state["checkpointing=False"]["generator"]["gradients"]}
    for e in (critic, generator):
        e.destroy()
    return state


def cell_config(size: str, method: str, zero: int, workers: int, extra: list[str] = ()) -> Config:
    return load_config("debug", [*SIZES[size], *METHODS[method], f"parallel.zero_stage={zero}",
                                 f"parallel.num_workers={workers}", *extra])


def worker_main(args) -> int:
    """One rank: every cell of this world size, in order; writes its numbers as JSON."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world)
    results = []
    for cell in json.loads(args.cells):
        cfg = cell_config(cell["size"], cell["method"], cell["zero"], args.world)
        t0 = time.perf_counter()
        try:
            from pipelines.distill import check

            check(cfg)
        except ValueError as err:
            results.append({**cell, "refused": " ".join(str(err).split())})
            continue
        results.append({**cell, **measure_cell(cfg), "seconds": round(time.perf_counter() - t0, 1)})
        gc.collect()  # the cell's engines and roles, before the next one is measured
        if args.rank == 0:
            print(f"[memory] {cell} done in {results[-1]['seconds']} s", flush=True)
    Path(args.result).write_text(json.dumps(results))
    dist.destroy_process_group()
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, cells: list[dict], timeout: float) -> list[dict]:
    """Run ``cells`` on ``world`` gloo ranks (one process each); per cell, the largest number
    any rank holds."""
    with tempfile.TemporaryDirectory(prefix="w2svd-bench-memory-") as tmp:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        procs = []
        for rank in range(world):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--rank", str(rank),
                   "--world", str(world), "--cells", json.dumps(cells), "--result", f"{tmp}/rank{rank}.json"]
            procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                                    "WORLD_SIZE": str(world)}))
        try:
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            raise RuntimeError(f"memory workers for world size {world} failed: exit codes {codes}")
        per_rank = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(world)]
    return [_max_over_ranks(list(rows)) | {"workers": world} for rows in zip(*per_rank)]


def _max_over_ranks(rows: list[dict]):
    first = rows[0]
    if isinstance(first, dict):
        return {k: _max_over_ranks([r[k] for r in rows]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return max(rows)
    return first


# ---------------------------------------------------------------------------------------------
# Activation probes (the planner's fit data): plain autograd, one process, no DeepSpeed


def probe_grid() -> list[dict]:
    """Architectures and shapes that vary every term of ``memory.activation_features`` on its own."""
    base = dict(heads=2, head_dim=8, mlp_ratio=2.0, dual=1, single=1, refiner=1, text=16,
                frames=9, height=64, width=48, batch=2, rank=4)
    grid = [base]
    for key, values in dict(heads=[4], head_dim=[16, 32], mlp_ratio=[4.0], dual=[2, 3], single=[2, 3],
                            refiner=[2], text=[8, 32], frames=[17], height=[32, 128], batch=[1], rank=[8]).items():
        grid += [{**base, key: v} for v in values]
    import random

    pick = random.Random(0).choice
    for _ in range(16):
        grid.append(dict(heads=pick([2, 4]), head_dim=pick([8, 16, 32]), mlp_ratio=pick([2.0, 4.0]),
                         dual=pick([1, 2, 3]), single=pick([1, 2, 3]), refiner=pick([1, 2]), text=pick([8, 16, 32]),
                         frames=pick([9, 17]), height=pick([32, 64]), width=pick([48, 96]), batch=pick([1, 2]),
                         rank=pick([4, 8])))
    return grid


def probe_overrides(p: dict) -> list[str]:
    return [f"model.arch.num_attention_heads={p['heads']}", f"model.arch.attention_head_dim={p['head_dim']}",
            f"model.arch.rope_axes_dim={ROPE_AXES[p['head_dim']]}", f"model.arch.mlp_ratio={p['mlp_ratio']}",
            f"model.arch.num_layers={p['dual']}", f"model.arch.num_single_layers={p['single']}",
            f"model.arch.num_refiner_layers={p['refiner']}", f"model.text_max_length={p['text']}",
            f"method.lora_rank={p['rank']}", f"method.generator_lora_rank={p['rank']}",
            f"optim.batch_size={p['batch']}",
            f"data.buckets=[{{name: probe, frames: {p['frames']}, height: {p['height']}, width: {p['width']}}}]"]


def measure_activations(cfg: Config) -> dict:
    """Transient peak of one critic and one generator step (plain autograd), per checkpointing."""
    from w2svd.distill import StepSettings, critic_step, generator_step
    from w2svd.models.hunyuan import build_backbone
    from w2svd.roles import build_roles_from_config

    roles = build_roles_from_config(build_backbone(cfg.model), cfg.method)
    dtype = getattr(torch, cfg.model.dtype)
    for p in roles.parameters():  # as DeepSpeed's bf16 mode casts every engine's parameters
        p.data = p.data.to(dtype)
    st = StepSettings.from_config(cfg.method)
    rng = torch.Generator().manual_seed(0)
    x, cond = make_batch(cfg, rng)
    out = {}
    for ckpt in (False, True):
        set_gradient_checkpointing(roles, ckpt)
        for name, step in (("critic", critic_step), ("generator", generator_step)):
            with AllocationTracker() as tracker:
                mark = tracker.mark()
                step(roles, x, cond, st, generator=rng)
                out[f"{name}/checkpointing={ckpt}"] = tracker.since(mark)[0]
            for p in roles.parameters():
                p.grad = None
    return out


def run_probes(methods: list[str], dtypes: list[str]) -> list[dict]:
    rows = []
    for p, method, dtype in itertools.product(probe_grid(), methods, dtypes):
        cfg = load_config("debug", [*probe_overrides(p), *METHODS[method], f"model.dtype={dtype}"])
        rows.append({"probe": p, "method": method, "dtype": dtype, **measure_activations(cfg)})
    return rows


def fit(rows: list[dict]) -> dict:
    """Least-squares coefficients of ``memory.activation_features`` (relative error weighted,
    non-negative) per dtype, method, step and checkpointing, over every probe row. Per method:
    what a step saves depends on which weights are trained (a trained full copy saves every
    layer's input for its weight gradient, a frozen base with adapters much less)."""
    import numpy as np
    from scipy.optimize import nnls

    coeffs = {}
    keys = sorted({(r["dtype"], r["method"], k) for r in rows for k in r if "/checkpointing=" in k})
    for dtype, method, key in keys:
        sel = [r for r in rows if r["dtype"] == dtype and r["method"] == method]
        X = np.array([memory.activation_features(probe_shape(r["probe"]), method) for r in sel], float)
        y = np.array([r[key] for r in sel], float)
        w = 1.0 / y
        c, _ = nnls(X * w[:, None], y * w)
        err = (X @ c - y) / y
        coeffs[f"{dtype}/{method}/{key}"] = {"coefficients": [round(float(v), 3) for v in c],
                                             "max_rel_error": round(float(abs(err).max()), 4)}
    return coeffs


def fit_joint(probes: list[dict], cells: list[dict], probe_weight: float = 0.1) -> dict:
    """The fp32 activation coefficients and ``memory.DEEPSPEED_COEFFICIENTS`` together, per
    method, step and checkpointing: the non-negative coefficients that minimise the largest
    relative error over the DeepSpeed cells plus ``probe_weight`` × the largest over the probes
    (a linear program). A cell is ``activation_features`` + [T·e] + [ZeRO-3, N > 1]·G·e
    (``memory.deepspeed_step_bytes``); where ``max(a, T·e)`` can decide a cell (T·e within 10 %
    of the measurement) only its upper bound binds the fit. The probe grid's architectures stop
    at hidden 128, so the cells (hidden up to 512) are what holds the larger sizes in place."""
    import numpy as np
    from scipy.optimize import linprog

    n_act, n_ds = len(memory.FEATURES), 1 + len(memory.GATHER_FEATURES)
    out = {}
    for method in sorted({c["method"] for c in cells if "refused" not in c}):
        for step, ck in itertools.product(("critic", "generator"), (False, True)):
            rows = []  # (features, measured, lower bound binds, is a cell)
            for r in probes:
                if r["dtype"] == "float32" and r["method"] == method:
                    rows.append((memory.activation_features(probe_shape(r["probe"]), method) + [0.0] * n_ds,
                                 r[f"{step}/checkpointing={ck}"], True, False))
            for c in cells:
                if "refused" in c or c["method"] != method:
                    continue
                cfg = cell_config(c["size"], method, c["zero"], c["workers"])
                e = memory.weight_bytes(cfg)  # the cells run in fp32; read, not assumed
                eng = memory.layout(memory.inventory(cfg), method).engines[0 if step == "critic" else 1]
                gathered = c["zero"] == 3 and c["workers"] > 1
                g = [v * e for v in memory.gather_features(eng)] if gathered else [0.0] * (n_ds - 1)
                m = c[f"checkpointing={ck}"][step]["activations"]
                reduced = c["workers"] > 1 or c["zero"] == 3
                rows.append((memory.activation_features(memory.Shape.from_config(cfg), method) + [eng.trained * e, *g],
                             m, not (reduced and eng.trained * e >= 0.9 * m), True))
            a_ub, b_ub = [], []
            for feats, measured, lower, is_cell in rows:
                x = [f / measured for f in feats]
                t = [-1.0, 0.0] if is_cell else [0.0, -1.0]
                a_ub.append(x + t)
                b_ub.append(1.0)
                if lower:
                    a_ub.append([-v for v in x] + t)
                    b_ub.append(-1.0)
            k = n_act + n_ds
            res = linprog([0.0] * k + [1.0, probe_weight], A_ub=np.array(a_ub), b_ub=np.array(b_ub),
                          bounds=[(0, None)] * (k + 2), method="highs")
            assert res.success, res.message
            coef = [round(float(v), 6) for v in res.x[:k]]
            out[f"{method}/{step}/checkpointing={ck}"] = {
                "activation": coef[:n_act], "deepspeed": coef[n_act:],
                "max_rel_error_cells": round(float(res.x[k]), 4), "max_rel_error_probes": round(float(res.x[k + 1]), 4)}
    return out


def probe_shape(p: dict) -> memory.Shape:
    return memory.Shape.from_config(load_config("debug", probe_overrides(p)))


# ---------------------------------------------------------------------------------------------
# Report


def compare(rows: list[dict]) -> list[dict]:
    """Each measured cell beside the planner's prediction for the same config and world size."""
    out = []
    for r in rows:
        if "refused" in r:
            out.append(r)
            continue
        cfg = cell_config(r["size"], r["method"], r["zero"], r["workers"])
        plan = memory.plan(cfg, gpus=r["workers"], gpu_mem_gib=1e6, zero_stage=r["zero"])
        out.append({**r, "predicted": plan.as_dict()})
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def markdown(report: dict) -> str:
    lines = []
    cells = report["cells"]
    lines += ["| size | method | ZeRO | workers | parameters | gradients | optimizer | buckets | "
              "act. critic (ckpt off / on) | act. generator (off / on) | state vs DMD2 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in cells:
        if "refused" in r:
            lines.append(f"| {r['size']} | {r['method']} | {r['zero']} | {r['workers']} | refused: "
                         f"{r['refused'][:90]}… | | | | | | |")
            continue
        p = r["predicted"]

        def pair(measured, predicted):
            return f"{mib(measured)} / {mib(predicted)}"

        grads = r["gradients"]["critic"] + r["gradients"]["generator"]
        act = {ck: r[f"checkpointing={ck}"] for ck in (False, True)}
        lines.append(
            f"| {r['size']} | {r['method']} | {r['zero']} | {r['workers']} | {pair(r['parameters'], p['parameters'])} | "
            f"{pair(grads, p['gradients'])} | {pair(r['optimizer'], p['optimizer'])} | "
            f"{pair(r['buckets'], p['buckets'])} | "
            f"{mib(act[False]['critic']['activations'])} / {mib(p['activations']['critic']['false'])}, "
            f"{mib(act[True]['critic']['activations'])} / {mib(p['activations']['critic']['true'])} | "
            f"{mib(act[False]['generator']['activations'])} / {mib(p['activations']['generator']['false'])}, "
            f"{mib(act[True]['generator']['activations'])} / {mib(p['activations']['generator']['true'])} | "
            f"{r.get('ratio_vs_dmd2', '')} |")
    return "\n".join(lines)


def add_ratios(cells: list[dict]) -> None:
    def state(r):
        return r["parameters"] + r["optimizer"] + r["gradients"]["critic"] + r["gradients"]["generator"]

    dmd2 = {(r["size"], r["zero"], r["workers"]): state(r) for r in cells
            if r.get("method") == "dmd2" and "refused" not in r}
    for r in cells:
        key = (r["size"], r["zero"], r["workers"])
        if "refused" not in r and key in dmd2:
            r["ratio_vs_dmd2"] = round(state(r) / dmd2[key], 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="w2svd bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for memory.json and memory.md")
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--zero", default="2,3")
    p.add_argument("--probes", action="store_true", help="also run the activation probe grid")
    p.add_argument("--fit", action="store_true", help="fit the planner's activation coefficients (bf16: to the "
                                                   "probes; fp32 and DeepSpeed's terms: to the probes and cells)")
    p.add_argument("--report", type=Path, metavar="MEMORY_JSON",
                   help="no measuring: compare an earlier memory.json with the current planner")
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per world size")
    # Internal: one rank of a world (started by run_world).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cells", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.out is None:
        p.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "memory.json"

    def save():
        path.write_text(json.dumps(report, indent=1, default=str))

    report = json.loads(args.report.read_text()) if args.report else measure(args, argv)
    save()  # the cells took long: keep them whatever happens next
    if (args.probes or args.fit) and "probes" not in report:
        report["probes"] = run_probes(args.methods.split(","), ["float32", "bfloat16"])
        save()
    if args.fit:
        # bf16 from the probes alone (no bf16 cells on CPU); fp32 jointly with the cells.
        report["fit"] = fit([r for r in report["probes"] if r["dtype"] != "float32"])
        memory.ACTIVATION_COEFFICIENTS.update({k: v["coefficients"] for k, v in report["fit"].items()})
        report["fit_joint"] = fit_joint(report["probes"], report["cells"])
        for key, v in report["fit_joint"].items():
            memory.ACTIVATION_COEFFICIENTS[f"float32/{key}"] = v["activation"]
            memory.DEEPSPEED_COEFFICIENTS[key] = tuple(v["deepspeed"])
        print(json.dumps(report["fit"], indent=1), json.dumps(report["fit_joint"], indent=1))
    if memory.ACTIVATION_COEFFICIENTS:
        report["cells"] = compare(report["cells"])
    save()
    text = markdown(report) if memory.ACTIVATION_COEFFICIENTS else "(no planner coefficients yet: run with --fit)"
    (args.out / "memory.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {path} and memory.md ({report['seconds']:.0f} s measuring, load "
          f"{report['load_average_start'][0]:.1f} → {report['load_average_end'][0]:.1f})")
    return 0


def measure(args, argv) -> dict:
    sizes, methods = args.sizes.split(","), args.methods.split(",")
    unknown = sorted(set(sizes) - set(SIZES)) + sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"w2svd bench memory: unknown size or method {unknown}")
    torch.set_num_threads(1)
    started = time.time()
    report = {"machine": f"{describe_machine()}, torch {torch.__version__} CPU, gloo", "load_average_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(["w2svd bench memory", *(sys.argv[1:] if argv is None else argv)])}
    cells = [{"size": s, "method": m, "zero": z} for s in sizes for m in methods
             for z in map(int, args.zero.split(","))]
    rows = []
    for world in map(int, args.workers.split(",")):
        rows += run_world(world, cells, args.timeout)
        (args.out / f"cells-{world}.json").write_text(json.dumps(rows))  # partial, in case a later world fails
    add_ratios(rows)
    report["cells"] = rows
    report["seconds"] = round(time.time() - started, 1)
    report["load_average_end"] = os.getloadavg()
    return report


if __name__ == "__main__":
    sys.exit(main())
