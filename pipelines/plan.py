"""How much GPU memory a distillation run needs, per GPU, and how many GPUs to ask for.

    w2svd plan --config hunyuan-t2v-13b --gpus 8 --gpu-mem-gib 80
    w2svd plan --config hunyuan-t2v-13b --gpus 8 --gpu-mem-gib 80 --method w2svd-lora --zero 2

For each method (all three by default: W2SVD with a full generator, W2SVD shared-base, vanilla
DMD2) it prints, per GPU: weights, gradients, optimizer state (fp32 master + Adam), the generator
EMA (``method.generator_ema``), DeepSpeed's reduce buckets, the activations of one critic and one
generator step for the configured bucket with and without gradient checkpointing, the peak,
whether it fits, the largest batch per GPU that fits, and the smallest number of such GPUs on
which the run fits. The memory model is ``w2svd/memory/``, checked against measurements by
``w2svd bench memory``.
"""

from __future__ import annotations

import json
import sys

from pipelines.errors import ArgumentParser, run_main
from w2svd import memory
from w2svd.config import load_config

PROG = "w2svd plan"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="hunyuan-t2v-13b", help="named config or YAML path")
    p.add_argument("--gpus", type=int, required=True, help="data-parallel GPUs (ranks)")
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="memory of one GPU, GiB")
    p.add_argument("--method", default="all", choices=["all", *memory.METHODS],
                   help="which method to plan (default: all three)")
    p.add_argument("--zero", type=int, choices=[2, 3], default=None, help="ZeRO stage (default: the config's)")
    p.add_argument("--batch", type=int, default=None, help="batch per GPU (default: optim.batch_size)")
    p.add_argument("--reserve-gib", type=float, default=3.0,
                   help="kept per GPU for the CUDA context, NCCL buffers and fragmentation (default 3)")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.gradient_checkpointing=false")
    return p


def plans(args) -> list[dict]:
    if args.gpus < 1 or args.gpu_mem_gib <= args.reserve_gib:
        raise ValueError(f"--gpus must be ≥ 1 and --gpu-mem-gib larger than --reserve-gib ({args.reserve_gib})")
    methods = list(memory.METHODS) if args.method == "all" else [args.method]
    out = []
    for method in methods:
        cfg = load_config(args.config, [*args.overrides, *memory.METHODS[method]])
        p = memory.plan(cfg, args.gpus, args.gpu_mem_gib, args.zero, args.batch, args.reserve_gib)
        smallest = memory.smallest_gpus(cfg, args.gpu_mem_gib, args.zero, args.reserve_gib, batch=args.batch)
        frames = None if p.fits else memory.largest_frames(cfg, p)
        out.append({"plan": p, "smallest_gpus": smallest, "largest_frames": frames})
    return out


def table(rows: list[dict], args) -> str:
    g = memory.gib
    cols = [r["plan"] for r in rows]
    shape = memory.Shape.from_config(load_config(args.config, args.overrides), batch=cols[0].batch)
    ck = cols[0].checkpointing
    lines = [f"{PROG}: {args.config}, {args.gpus} × {args.gpu_mem_gib:g} GiB GPUs ({args.reserve_gib:g} GiB each kept "
             f"for CUDA, NCCL and fragmentation), batch {cols[0].batch} per GPU, {shape.video_tokens:,} video + "
             f"{shape.text_tokens} text tokens per sample, {cols[0].activation_dtype}, gradient checkpointing "
             f"{'on' if ck else 'off'}", ""]

    def row(label, values):
        lines.append(f"{label:<40}" + "".join(f"{v:>26}" for v in values))

    row("per GPU (GiB)", [memory.METHOD_LABELS[p.method][:25] for p in cols])
    row("ZeRO stage", [str(p.zero_stage) for p in cols])
    row("weights", [f"{g(p.parameters):.2f}" for p in cols])
    row("gradients", [f"{g(p.gradients):.2f}" for p in cols])
    row("optimizer (fp32 master + Adam)", [f"{g(p.optimizer):.2f}" for p in cols])
    row("generator EMA (fp32)", [f"{g(p.state.ema):.2f}" for p in cols])
    row("reduce buckets", [f"{g(p.state.buckets):.2f}" + (" held" if p.state.buckets_held else " in bwd")
                           for p in cols])
    for step in ("critic", "generator"):
        row(f"activations, {step} step (ckpt off / on)",
            [f"{g(p.activations[step][False]):.1f} / {g(p.activations[step][True]):.1f}" for p in cols])
    row("optimizer step (temporary)", [f"{g(max(p.state.step_transient)):.2f}" for p in cols])
    row(f"peak (ckpt {'on' if ck else 'off'})", [f"{g(p.peak()):.1f}" for p in cols])
    row(f"fits in {args.gpu_mem_gib:g} − {args.reserve_gib:g} GiB", ["yes" if p.fits else "NO" for p in cols])
    row("largest batch per GPU that fits", [str(p.max_batch) for p in cols])
    row(f"smallest number of {args.gpu_mem_gib:g} GiB GPUs",
        [str(r["smallest_gpus"]) if r["smallest_gpus"] else "none" for r in rows])
    row("largest frames that fit at batch 1", ["—" if r["largest_frames"] is None else str(r["largest_frames"])
                                               for r in rows])
    notes = sorted({n for p in cols for n in p.notes})
    if any(r["smallest_gpus"] is None for r in rows):
        notes.append("none: one sample's activations (or ZeRO-2's whole weights) exceed a GPU whatever the "
                     "count; sequence parallelism is not implemented, so use a smaller bucket (frames above)")
    lines += [""] + [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        rows = plans(args)
        if args.json:
            print(json.dumps([{**r["plan"].as_dict(), "smallest_gpus": r["smallest_gpus"],
                               "largest_frames": r["largest_frames"]} for r in rows], indent=2))
        else:
            print(table(rows, args))
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
