"""``w2svd synth-data --out URI --clips N``: synthetic talking-head clips for tests, the demo and
the benchmarks, written to a folder or an ``s3://`` prefix.

    w2svd synth-data --out /tmp/synth --clips 8 --seed 0
    w2svd synth-data --out s3://bucket/raw --clips 100 --portrait-size 144x256 --frames 33,65
"""

from __future__ import annotations

import argparse
import sys
import time

from pipelines.errors import ArgumentParser, run_main
from w2svd.data import storage, synth


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        sizes = tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT[,WIDTHxHEIGHT...]") from None
    if any(len(s) != 2 or s[0] % 2 or s[1] % 2 or min(s) < 16 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be WIDTHxHEIGHT, even, at least 16")
    return sizes


def _numbers(kind):
    def parse(text: str):
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {kind.__name__}") from None
    return parse


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="w2svd synth-data", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix")
    p.add_argument("--clips", type=int, required=True, help="number of clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--portrait-size", type=_sizes, default=synth.DEFAULT_PORTRAIT_SIZES, help="WxH[,WxH] (9:16)")
    p.add_argument("--landscape-size", type=_sizes, default=synth.DEFAULT_LANDSCAPE_SIZES, help="WxH[,WxH] (16:9)")
    p.add_argument("--frames", type=_numbers(int), default=synth.DEFAULT_LENGTHS, help="clip lengths to draw from")
    p.add_argument("--fps", type=_numbers(float), default=synth.DEFAULT_FPS, help="frame rates to draw from")
    p.add_argument("--landscape-fraction", type=float, default=0.3)
    p.add_argument("--codec", choices=["mpeg4", "libx264"], default=None,
                   help="video codec (default mpeg4: byte-reproducible; libx264 output varies run to run)")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main("w2svd synth-data", lambda: _run(build_parser().parse_args(argv)))


def _run(args) -> int:
    if args.clips < 1:
        raise ValueError("--clips must be >= 1")
    options = storage.StorageOptions.from_env(args.endpoint)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"[synth-data] {done}/{total} clips", flush=True)

    synth.write_dataset(args.out, args.clips, seed=args.seed, options=options, progress=progress,
                        portrait_sizes=args.portrait_size, landscape_sizes=args.landscape_size,
                        codec=args.codec, lengths=args.frames, fps_choices=args.fps, landscape_fraction=args.landscape_fraction)
    print(f"[synth-data] wrote {args.clips} clips and captions.jsonl to {args.out} "
          f"in {time.perf_counter() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
