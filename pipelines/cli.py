"""The ``w2svd`` command: one entry point that dispatches to each stage's ``main(argv)``.

Each stage lives in its own module with a ``main(argv: list[str]) -> int`` that parses its own
flags, so ``w2svd preencode …`` and ``python -m pipelines.preencode …`` are the same program.
Modules are imported only when their command runs, keeping ``w2svd --help`` fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.demo", "the whole pipeline on a tiny local default"),
    "synth-data": ("pipelines.synth_data", "render synthetic portrait clips to a folder or bucket"),
    "preencode": ("pipelines.preencode", "Ray Data: raw clips → latent Parquet shards"),
    "finetune": ("pipelines.finetune", "Ray Train: teacher flow-matching fine-tune"),
    "distill": ("pipelines.distill", "Ray Train + DeepSpeed: W2SVD and baselines"),
    "evaluate": ("pipelines.evaluate", "metrics of a generator against a reference"),
    "register": ("pipelines.promote", "log an export as an MLflow model version (alias challenger)"),
    "promote": ("pipelines.promote", "move alias champion when the gates hold"),
    "generate": ("pipelines.generate", "Ray Data: a prompt table → mp4s + a results Parquet"),
    "serve": ("pipelines.serve", "Ray Serve: the generator as an HTTP video API (foreground)"),
    "rollback": ("pipelines.promote", "point champion back at the previous version"),
    "bench": ("bench", "benchmarks: toy, toy-family, ... (bench/NAME.py)"),
    "plan": ("pipelines.plan", "GPU memory per GPU and how many GPUs a distillation run needs"),
    "world": ("pipelines.world", "build (or show) a config's self-trained portrait world: VAE, teacher"),
    "config": ("pipelines.show_config", "print a resolved config"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: w2svd COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"w2svd: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, f"{name.replace('-', '_')}_main", None) or module.main
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
