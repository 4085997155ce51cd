"""Why a portrait-world teacher draws faces or not: short fine-tunes of fresh transformers.

    w2svd bench portrait-teacher --latents TEACHER_DIR --out DIR [--steps 2000] [--variants a,b]

Each variant trains a fresh HunyuanVideo transformer on the pre-encoded clips of a built world
teacher (``TEACHER_DIR``: a ``w2svd world show --config portrait --path teacher`` folder, whose
``config.yaml``, encoders, VAE and ``latents/`` it reuses) with the library's flow-matching step,
in one process and without Ray, so that variants differ only in what they name. Every 500 steps
it measures the x0 prediction ``x_t − σ·v`` on 32 training clips at σ 1 / 0.95 / 0.8 / 0.5
against the clips (MSE; the per-position mean of the data scores ``mse_mean``, the bar a model
that knew where in the frame each token sits would pass at σ 1), and at the end the face
detection rate of ``--samples`` (16) decoded 28-step Euler samples (CFG 2) beside the VAE round
trip of real latents. Rows go to ``DIR/teacher-probe.jsonl``; a strip (real clips above samples)
to ``DIR/<variant>.png``.
The full build (``w2svd world build``) is the real path; this is its fast, controlled ablation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench._machine import start_local

# name: (lr, sigma density, attention_head_dim, AdamW β1, (double-stream, single-stream) blocks).
# 4 heads; rope axes scale with the head. β1 0 is optim.betas' (the distillation roles'), which
# the fine-tune used before it had its own optim.finetune_betas. 2 + 2 blocks is the world's.
VARIANTS = {
    "h64-lr3e-4-logit": (3e-4, "logit_normal", 16, 0.9, (2, 2)),
    "h64-lr3e-4-uniform": (3e-4, "uniform", 16, 0.9, (2, 2)),
    "h64-lr1e-3-uniform": (1e-3, "uniform", 16, 0.9, (2, 2)),
    "h128-lr3e-4-uniform": (3e-4, "uniform", 32, 0.9, (2, 2)),
    "h128-lr1e-3-uniform": (1e-3, "uniform", 32, 0.9, (2, 2)),
    "h128-lr1e-3-uniform-beta1-0": (1e-3, "uniform", 32, 0.0, (2, 2)),
    # Capacity beyond the fifth-round teacher's, whose samples stay short of the real face rate.
    "h128-deep-lr1e-3-uniform": (1e-3, "uniform", 32, 0.9, (4, 4)),
    "h192-lr1e-3-uniform": (1e-3, "uniform", 48, 0.9, (2, 2)),
}
PROBE_SIGMAS = (1.0, 0.95, 0.8, 0.5)


def encoding_vae(latents_dir: Path) -> str | None:
    """The folder of the VAE that encoded the shards under ``latents_dir`` (their ``vae_id`` names its key). The
    folder's config names the VAE by ``world:CONFIG/vae``, which follows the config's current
    VAE settings; after those change, decoding these latents with it would be wrong."""
    import pyarrow.parquet as pq

    from w2svd import world

    first = next(iter(sorted((latents_dir / "shards").glob("*.parquet"))), None)
    vae_id = pq.read_table(first, columns=["vae_id"]).column(0)[0].as_py() if first else ""
    if "@" not in vae_id:
        return None
    folder = world.world_cache_root() / world.part_dir_name("vae", vae_id.rsplit("@", 1)[1])
    return str(folder) if folder.is_dir() else None


def load_world_latents(latents_dir: Path):
    """Latents ``[N, C, T, h, w]`` and captions of every clip in a pre-encode output folder."""
    import pyarrow.parquet as pq
    import torch

    from w2svd.data import shards

    rows = [r for f in sorted((latents_dir / "shards").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    if not rows:
        raise FileNotFoundError(f"no pre-encoded shards under {latents_dir / 'shards'}")
    x0 = torch.stack([shards.tensor_from_bytes(r["latent"], r["latent_shape"], r["latent_dtype"]) for r in rows])
    return x0.float(), [r["caption"] for r in rows]


def run_variant(name: str, teacher_dir: Path, steps: int, batch: int, out: Path, n_samples: int = 16,
                log=print) -> dict:
    import torch

    from pipelines.sample_strips import write_sample_strip
    from w2svd.baselines import flow_matching_step
    from w2svd.config import load_config
    from w2svd.generate import load_teacher_bundle
    from w2svd.metrics.portrait import face_detection_rate
    from w2svd.models.base import Cond
    from w2svd.models.hunyuan import build_backbone
    from w2svd.roles import View
    from w2svd.schedule import sample_training_sigmas

    lr, density, head_dim, beta1, (double, single) = VARIANTS[name]
    config = str(teacher_dir / "config.yaml")
    rope = [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]
    cfg = load_config(config, ["model.teacher=null", f"model.arch.attention_head_dim={head_dim}",
                               f"model.arch.rope_axes_dim=[{','.join(map(str, rope))}]",
                               f"model.arch.num_layers={double}", f"model.arch.num_single_layers={single}"])
    vae = encoding_vae(teacher_dir / "latents")
    bundle = load_teacher_bundle(str(teacher_dir), cfg.method.teacher_steps, config,
                                 [f"model.vae={vae}"] if vae else [], device="cpu")
    x0, captions = load_world_latents(teacher_dir / "latents")
    text, mask, pooled = bundle.encoders.encode_text(captions)

    def cond_of(idx):
        return Cond(text=text[idx], text_mask=mask[idx].to(text.dtype), pooled=pooled[idx])

    model = build_backbone(cfg.model).train().requires_grad_(True)
    view = View(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(beta1, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    probe = torch.arange(0, len(x0), 4)[:32]
    eps_probe = torch.randn(x0[probe].shape, generator=torch.Generator().manual_seed(1))
    mse_mean = ((x0[probe] - x0.mean(0, keepdim=True)) ** 2).mean().item()

    @torch.no_grad()
    def x0_errors() -> dict:
        model.eval()
        out = {}
        for s in PROBE_SIGMAS:
            sigma_B = torch.full((len(probe),), s)
            x_t = (1 - s) * x0[probe] + s * eps_probe
            out[f"mse@{s}"] = round(((x_t - s * view(x_t, sigma_B, cond_of(probe)) - x0[probe]) ** 2).mean().item(), 4)
        model.train()
        return out

    start, curve = time.time(), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x0), (batch,), generator=gen)
        sigma_B = sample_training_sigmas(batch, cfg.method.shift, generator=gen, density=density)
        opt.zero_grad(set_to_none=True)
        flow_matching_step(view, x0[idx], cond_of(idx), sigma_B, uncond_prob=cfg.optim.finetune_uncond_prob,
                           generator=gen)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        if step % 500 == 0 or step == steps:
            curve.append({"step": step, "seconds": round(time.time() - start, 1), **x0_errors()})
            log(f"[portrait-teacher] {name} {curve[-1]}")

    bundle.backbone = model.eval()
    picked = list(range(0, len(x0), max(1, len(x0) // n_samples)))[:n_samples]
    samples = bundle.decode(bundle.generate_latents([captions[i] for i in picked], list(range(len(picked))),
                                                    *world_size(cfg)))
    real = bundle.decode(x0[picked])
    write_sample_strip(out / f"{name}.png", real.numpy()[:4], {f"{name}\nEuler 28 steps": samples.numpy()[:4]})
    return {"variant": name, "lr": lr, "density": density, "beta1": beta1, "hidden": 4 * head_dim,
            "blocks": [double, single], "samples": len(picked), "steps": steps, "batch": batch,
            "params": sum(p.numel() for p in model.parameters()), "mse_mean": round(mse_mean, 4), "curve": curve,
            "face_rate": face_detection_rate(samples.numpy()), "face_rate_real_vae": face_detection_rate(real.numpy()),
            "guidance_scale": cfg.method.guidance_scale, "seconds": round(time.time() - start, 1)}


def world_size(cfg) -> tuple[int, int, int]:
    b = cfg.data.buckets[0]
    return b.frames, b.height, b.width


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="w2svd bench portrait-teacher", description=__doc__.splitlines()[0])
    p.add_argument("--latents", required=True, type=Path, help="a built world teacher folder (holds latents/)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--samples", type=int, default=16, help="28-step samples the face rate is measured on")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if not (args.latents / "config.yaml").is_file():
        p.error(f"{args.latents} is not a built world teacher folder (no config.yaml)")
    start_local(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        row = run_variant(name, args.latents, args.steps, args.batch, args.out, args.samples)
        with open(args.out / "teacher-probe.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
