"""Where a portrait-world teacher loses motion: frame-to-frame change in latent space.

    w2svd bench portrait-motion --config portrait --out DIR [--teacher FOLDER] [--prompts 16]

On the evaluation set's first ``--prompts`` items (the real clips and the prompts the table
scores), in latent space where the VAE's damping of small motions does not blur the picture:

* ``motion`` = ``mean((z[:, :, 2] − z[:, :, 1])²)`` of the real clips' latents and of the
  teacher's 28-step Euler samples (the last two latent frames each hold four video frames, so
  their difference is the clip's motion; the first holds frame 0 alone);
* the teacher's one-step x0 prediction ``x̂0 = x_σ − σ·v(x_σ, σ)`` from real latents noised to σ:
  its motion, and the cosine between its change ``x̂0[2] − x̂0[1]`` and the real one, per σ,
  beside the same cosine of the noised input ``x_σ`` itself (what a model that returned its
  input would score: denoising should beat it, except at small σ where the input is nearly clean).

A teacher that has learned motion predicts the real change at small σ and samples with motion
near the real clips'; one that predicts it at small σ but samples static clips decides motion
too late in sampling to create it. Prints a JSON report and writes ``DIR/motion.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench._machine import start_local

PROBE_SIGMAS = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95)


def latent_motion(z_BCTHW) -> float:
    """``mean((z[:, :, 2] − z[:, :, 1])²)``: the change between the last two latent frames."""
    return float(((z_BCTHW[:, :, 2] - z_BCTHW[:, :, 1]) ** 2).mean())


def change_cosine(pred_BCTHW, real_BCTHW) -> float:
    """Mean over clips of the cosine between the predicted and the real last-frame change."""
    import torch.nn.functional as F

    d_pred = (pred_BCTHW[:, :, 2] - pred_BCTHW[:, :, 1]).flatten(1)
    d_real = (real_BCTHW[:, :, 2] - real_BCTHW[:, :, 1]).flatten(1)
    return float(F.cosine_similarity(d_pred, d_real, dim=1).mean())


def measure(config: str, teacher: str | None, prompts: int, batch: int = 4) -> dict:
    import torch

    from w2svd.config import load_config
    from w2svd.data.buckets import to_model_input
    from w2svd.evalset import build_evalset, reference_clips
    from w2svd.generate import load_teacher_bundle

    cfg = load_config(config, [f"eval.num_prompts={prompts}"])
    evalset = build_evalset(cfg.eval)
    items, clips = evalset.items, reference_clips(evalset).numpy()
    bundle = load_teacher_bundle(teacher or config, cfg.method.teacher_steps, config, device="cpu")
    frames, height, width = items[0].num_frames, items[0].height, items[0].width
    if bundle.encoders.latent_shape(frames, height, width)[1] < 3:
        raise ValueError(f"{frames} frames make fewer than 3 latent frames: no latent motion to measure")
    images = list(clips[:, 0]) if bundle.image_to_video else None
    real, sampled = [], []
    cos, input_cos, pred_motion = ({s: [] for s in PROBE_SIGMAS} for _ in range(3))
    noise_gen = torch.Generator().manual_seed(cfg.eval.seed)
    with torch.no_grad():
        for start in range(0, len(items), batch):
            part = slice(start, start + batch)
            prompts_b = [it.prompt for it in items[part]]
            z0 = bundle.encoders.encode_video(torch.stack([to_model_input(c) for c in clips[part]]))
            cond = bundle.encode_prompts(prompts_b, images[part] if images else None, height, width)
            real.append(z0)
            sampled.append(bundle.generate_latents(prompts_b, [it.seed for it in items[part]], frames, height, width,
                                                   images=images[part] if images else None))
            eps = torch.randn(z0.shape, generator=noise_gen)
            for s in PROBE_SIGMAS:
                x_s = (1 - s) * z0 + s * eps
                x0_hat = x_s - s * bundle.backbone(x_s, torch.full((len(z0),), s), cond, None)
                cos[s].append(change_cosine(x0_hat, z0) * len(z0))
                input_cos[s].append(change_cosine(x_s, z0) * len(z0))
                pred_motion[s].append(latent_motion(x0_hat) * len(z0))
    real_z, sampled_z = torch.cat(real), torch.cat(sampled)
    n = len(real_z)
    return {"config": config, "teacher": bundle.source, "prompts": n, "steps": bundle.settings.steps,
            "motion_real": round(latent_motion(real_z), 5), "motion_teacher": round(latent_motion(sampled_z), 5),
            "motion_ratio": round(latent_motion(sampled_z) / max(latent_motion(real_z), 1e-12), 3),
            "x0_prediction": [{"sigma": s, "motion": round(sum(pred_motion[s]) / n, 5),
                               "change_cosine": round(sum(cos[s]) / n, 3),
                               "input_change_cosine": round(sum(input_cos[s]) / n, 3)} for s in PROBE_SIGMAS]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="w2svd bench portrait-motion", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="portrait", help="a portrait-world config (its teacher and evaluation set)")
    p.add_argument("--teacher", help="another teacher folder or export to read with the config's encoders")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--prompts", type=int, default=16, help="evaluation items (clips and prompts)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.prompts < 1:
        p.error("--prompts must be at least 1")
    start_local(args.threads)
    report = measure(args.config, args.teacher, args.prompts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "motion.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
