"""A world teacher's face rate on captions it trained on, against captions it never saw.

    w2svd bench teacher-captions --teacher DIR [--latents DIR] [--config portrait] [--prompts 64] [--steps 28] --out F.json

The evaluation job scores a teacher on 16 report prompts: new combinations of skin, hair,
background, face shape, speech and head turn. A teacher that draws faces for the captions of
its training clips but not for new ones is limited by its data, not its capacity; this
separates the two on more prompts than the report set holds (its 16 spread by about ±0.1).

- seen: ``--prompts`` captions of the teacher's own pre-encoded clips (``--latents``: a build's
  ``DIR/latents``; for a committed teacher, ``w2svd world show --config C --path latents``), evenly
  spaced over the shards; their real side is the VAE round trip of those clips' latents.
- held out: the first ``--prompts`` items of the config's evaluation set grown to
  ``4 × --prompts`` items, less any whose caption a training clip has; their real side is the
  synthetic clip each caption describes, rendered at the evaluation size.

Both sides sample with the teacher's ``--steps``-step Euler sampler and its guidance from the
evaluation job's noise (item ``i``: seed ``eval.seed + i``), so the held-out side's first 16
samples are the report set's. An image-to-video teacher gets each real clip's first frame as its reference.
Writes ``{"seen": {...}, "held_out": {...}}``: the face rates of samples and of the real clips
(overall and per prompt), and the gap real − samples with its standard error over prompts; for
the held-out side, whose factors are known, also the evaluation job's factor agreement and the
mouth's motion on talking and on silent captions, for samples, real clips and the real clips' VAE
round trip (what the latents can carry).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench._machine import start_local


def _round_trip(bundle, clips_BTHWC, batch: int):
    """uint8 clips through the teacher's VAE, encoded and decoded."""
    import numpy as np

    from w2svd.world import to_pixels

    return np.concatenate([bundle.decode(bundle.encoders.encode_video(to_pixels(clips_BTHWC[lo:lo + batch])
                                                                      .to(bundle.device))).numpy()
                           for lo in range(0, len(clips_BTHWC), batch)])


def caption_factors(factors: list[dict], **clips_BTHWC) -> dict:
    """What the captions say, seen in each named set of clips: the evaluation job's factor
    agreement, and the mouth's motion (``mouth_motion``, luma levels) on talking and on silent
    captions over the clips with a face (the caption's speech, apart from whether a face is found)."""
    import numpy as np

    from w2svd.metrics.portrait import clip_mouth_motion, factor_agreement

    out = {}
    for side, clips in clips_BTHWC.items():
        motion = [clip_mouth_motion(np.asarray(c)) for c in clips]
        talking = [m for m, f in zip(motion, factors, strict=True) if m is not None and f["talking"]]
        silent = [m for m, f in zip(motion, factors, strict=True) if m is not None and not f["talking"]]
        out[side] = {"agreement": factor_agreement(np.asarray(clips), factors),
                     "mouth_motion_talking": float(np.mean(talking)) if talking else None,
                     "mouth_motion_silent": float(np.mean(silent)) if silent else None,
                     "faces_talking": len(talking), "faces_silent": len(silent)}
    return out


def measure(teacher_dir: Path, latents_dir: Path, config: str, prompts: int, steps: int, batch: int = 8,
            log=print) -> dict:
    from bench.portrait_teacher import encoding_vae, load_world_latents
    from w2svd.generate import load_teacher_bundle
    from w2svd.held_out import face_rates, held_out_face_rates, sample_like, split_captions

    vae = encoding_vae(latents_dir)
    bundle = load_teacher_bundle(str(teacher_dir), steps, config, [f"model.vae={vae}"] if vae else [], device="cpu")
    x0, train_captions = load_world_latents(latents_dir)
    seen, _ = split_captions(train_captions, [], prompts)

    # The evaluation job's noise on both sides (item i: seed eval.seed + i), so the sides differ by
    # caption only and the held-out side's first items are the report set's samples.
    seeds = [bundle.cfg.eval.seed + i for i in range(len(seen))]
    start = time.time()
    seen_real = bundle.decode(x0[seen])
    rows = {"seen": face_rates(sample_like(bundle, [train_captions[i] for i in seen], seeds, seen_real, batch),
                               seen_real)}
    log(f"[teacher-captions] seen: face rate {rows['seen']['face_rate']:.3f} ({time.time() - start:.0f} s)")
    new = held_out_face_rates(bundle, train_captions, prompts, batch, log=log)
    rows["held_out"] = {**new.rates,
                        # The VAE round trip: what of the real clips' factors the latents can carry at all.
                        "factors": caption_factors(new.factors, samples=new.samples_BTHWC, real=new.real_BTHWC,
                                                   vae=_round_trip(bundle, new.real_BTHWC, batch))}
    log(f"[teacher-captions] held out: face rate {rows['held_out']['face_rate']:.3f} ({time.time() - start:.0f} s)")
    return {"teacher": str(teacher_dir), "latents": str(latents_dir), "config": config, "steps": steps,
            "guidance_scale": bundle.cfg.method.guidance_scale, "training_clips": len(train_captions),
            **rows, "seconds": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="w2svd bench teacher-captions", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, type=Path,
                   help="a built world teacher folder (`w2svd world show --path teacher`; holds latents/)")
    p.add_argument("--latents", type=Path, help="its training shards' folder (default: TEACHER/latents)")
    p.add_argument("--config", default="portrait", help="the world's config (its encoders and evaluation set)")
    p.add_argument("--prompts", type=int, default=64, help="captions on each side")
    p.add_argument("--steps", type=int, default=28, help="Euler steps of the teacher's sampler")
    p.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    latents = args.latents or args.teacher / "latents"
    if not (latents / "shards").is_dir():
        p.error(f"{latents} holds no pre-encoded shards (no shards/): give the teacher's --latents")
    if args.prompts < 1:
        p.error("--prompts must be at least 1")
    start_local(args.threads)
    row = measure(args.teacher, latents, args.config, args.prompts, args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
