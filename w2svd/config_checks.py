"""The config's validation: the rules that span keys or bound numbers (``ValueError`` naming the key).

Single keys are checked as they are read (``w2svd.config.from_dict``); ``validate`` runs after.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from w2svd.config_schema import Config


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(cfg: Config) -> None:
    m, o, a, p = cfg.method, cfg.optim, cfg.model.arch, cfg.parallel
    _check(m.student_steps in (1, 2, 4, 8), f"method.student_steps = {m.student_steps}; choose one of [1, 2, 4, 8]")
    _check(0.0 <= m.alpha_weak <= 1.0, f"method.alpha_weak = {m.alpha_weak} must lie in [0, 1]")
    _check(0.0 < m.alpha_strong, f"method.alpha_strong = {m.alpha_strong} must be positive")
    _check(m.alpha_weak <= m.alpha_strong, "method.alpha_weak must not exceed method.alpha_strong")
    _check(
        0.0 <= m.sigma_min < m.sigma_max <= 1.0,
        f"method.sigma_min/sigma_max = {m.sigma_min}/{m.sigma_max} must satisfy 0 <= min < max <= 1",
    )
    _check(m.shift > 0, f"method.shift = {m.shift} must be positive")
    _check(m.gen_update_every >= 1, "method.gen_update_every must be >= 1")
    for key in ("lora_rank", "generator_lora_rank", "teacher_steps", "lcm_teacher_steps"):
        _check(getattr(m, key) >= 1, f"method.{key} must be >= 1")
    for key in ("lambda_dmd", "lambda_reg", "lambda_gan_gen", "lambda_gan_disc"):
        _check(getattr(m, key) >= 0, f"method.{key} must be >= 0")
    _check(0.0 <= m.generator_ema < 1.0, "method.generator_ema must lie in [0, 1)")
    _check(m.critic_warmup >= 0, "method.critic_warmup must be >= 0")
    _check(m.critic_warmup < o.steps, f"method.critic_warmup = {m.critic_warmup} leaves no generator update "
           f"in optim.steps = {o.steps}")
    _check(0.0 <= m.lcm_target_ema < 1.0, "method.lcm_target_ema must lie in [0, 1)")
    if m.name == "dmd2" and m.generator == "lora":
        raise ValueError("method.generator = 'lora' needs method.name = 'w2svd' (vanilla DMD2 keeps full copies)")
    if cfg.model.family == "hunyuan-i2v" and m.guidance == "embedded":
        raise ValueError(
            "method.guidance = 'embedded' is not available for model.family = 'hunyuan-i2v' "
            "(HunyuanVideo-I2V has no guidance embedding); choose 'cfg' or 'none'"
        )
    _check(o.steps >= 1 and o.batch_size >= 1, "optim.steps and optim.batch_size must be >= 1")
    for key in ("generator_lr", "critic_lr", "disc_lr"):
        _check(getattr(o, key) > 0, f"optim.{key} must be positive")
    for key in ("betas", "finetune_betas"):
        betas = getattr(o, key)
        _check(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"optim.{key} must be two numbers in [0, 1)")
    _check(o.checkpoint_every >= 1 and o.log_every >= 1, "optim.checkpoint_every and log_every must be >= 1")
    _check(o.sample_every >= 1 and o.sample_count >= 1, "optim.sample_every and optim.sample_count must be >= 1")
    _check(o.finetune_lora_rank >= 0, "optim.finetune_lora_rank must be >= 0 (0 = full fine-tune)")
    _check(o.finetune_lr > 0, "optim.finetune_lr must be positive")
    _check(0.0 <= o.finetune_uncond_prob < 1.0, "optim.finetune_uncond_prob must lie in [0, 1)")
    _check(0.0 <= o.finetune_ema < 1.0, "optim.finetune_ema must lie in [0, 1)")
    _check(o.finetune_sigma_shift is None or o.finetune_sigma_shift > 0,
           f"optim.finetune_sigma_shift = {o.finetune_sigma_shift} must be positive (or null: method.shift)")
    h = cfg.health
    _check(h.patience >= 1 and h.max_rollbacks >= 0, "health.patience must be >= 1 and health.max_rollbacks >= 0")
    _check(0.0 < h.lr_decay_on_rollback <= 1.0, "health.lr_decay_on_rollback must lie in (0, 1]")
    _check(len(h.sample_std_band) == 2 and 0 <= h.sample_std_band[0] < h.sample_std_band[1],
           "health.sample_std_band must be [low, high] with 0 <= low < high")
    _check(h.loss_max > 0, "health.loss_max must be positive")
    _check(h.drift_rise >= 0 and h.drift_margin >= 0, "health.drift_rise and health.drift_margin must be >= 0")
    _check(h.drift_patience >= 1 and h.drift_warmup >= 0 and (h.drift_every is None or h.drift_every >= 1)
           and h.drift_window * o.batch_size >= 2,
           "health.drift_patience and health.drift_every (or null) must be >= 1, health.drift_warmup >= 0, "
           "and health.drift_window × optim.batch_size >= 2 (rows the drift statistic compares)")
    _check(0.0 <= h.drift_smoothing < 1.0, "health.drift_smoothing must lie in [0, 1)")
    _check(p.max_failures >= 0, "parallel.max_failures must be >= 0")
    _check(p.cpus_per_worker > 0, "parallel.cpus_per_worker must be positive")
    _check(sum(a.rope_axes_dim) == a.attention_head_dim,
           f"model.arch.rope_axes_dim {a.rope_axes_dim} must sum to attention_head_dim {a.attention_head_dim}")
    _check(p.num_workers >= 1, "parallel.num_workers must be >= 1")
    _check(p.zero3_persistence_threshold >= 0, "parallel.zero3_persistence_threshold must be >= 0")
    _check(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage = {p.zero_stage}; choose one of [0, 1, 2, 3]")
    for b in cfg.data.buckets:
        _check((b.frames - 1) % 4 == 0, f"data.buckets[{b.name}].frames = {b.frames} must be 4k+1 (VAE constraint)")
        _check(b.height % 16 == 0 and b.width % 16 == 0,
               f"data.buckets[{b.name}] size {b.height}x{b.width} must be multiples of 16")
    _check(len({b.name for b in cfg.data.buckets}) == len(cfg.data.buckets), "data.buckets names must be unique")
    d = cfg.data
    for key in ("shard_rows", "encode_batch_size", "decode_batch_size", "encoder_pool_size", "min_frames",
                "min_side", "max_bytes"):
        _check(getattr(d, key) >= 1, f"data.{key} must be >= 1")
    _check(d.encode_batch_pixels >= 0, "data.encode_batch_pixels must be >= 0 (0: no pixel budget)")
    _check(d.fps > 0 and d.max_seconds > 0, "data.fps and data.max_seconds must be positive")
    _check(d.encoder_num_gpus >= 0 and d.encoder_num_cpus >= 0 and d.decode_num_cpus > 0,
           "data.encoder_num_gpus/encoder_num_cpus must be >= 0 and data.decode_num_cpus > 0")
    va, w = cfg.model.vae_arch, cfg.world
    _check(va.spatial_compression_ratio in (2, 4, 8, 16),
           f"model.vae_arch.spatial_compression_ratio = {va.spatial_compression_ratio}; choose one of [2, 4, 8, 16]")
    _check(len(va.block_out_channels) > va.spatial_compression_ratio.bit_length() - 1,
           "model.vae_arch.block_out_channels needs one block more than the spatial downsamplings "
           f"(log2 {va.spatial_compression_ratio})")
    _check(len(w.vae_crop) == 3 and (w.vae_crop[0] - 1) % 4 == 0 and all(c >= 1 for c in w.vae_crop),
           f"world.vae_crop = {w.vae_crop} must be [frames (4k+1), height, width]")
    for key in ("vae_clips", "vae_test_clips", "vae_steps", "vae_batch_size", "data_clips", "teacher_steps",
                "teacher_batch_size"):
        _check(getattr(w, key) >= 1, f"world.{key} must be >= 1")
    _check(w.vae_lr > 0 and w.teacher_lr > 0 and w.vae_kl_weight >= 0,
           "world.vae_lr and world.teacher_lr must be positive, world.vae_kl_weight >= 0")
    e = cfg.eval
    _check(e.num_prompts >= 2, f"eval.num_prompts = {e.num_prompts} must be >= 2 (a Fréchet distance needs two samples)")
    _check((e.num_frames - 1) % 4 == 0, f"eval.num_frames = {e.num_frames} must be 4k+1 (VAE constraint)")
    _check(e.height % 16 == 0 and e.width % 16 == 0, f"eval size {e.height}x{e.width} must be multiples of 16")
    _check(e.fps > 0, "eval.fps must be positive")
    for key in ("domain_train_clips", "domain_train_steps", "domain_num_features", "generator_actors",
                "metric_actors", "batch_size"):
        _check(getattr(e, key) >= 1, f"eval.{key} must be >= 1")
    _check(e.actor_num_cpus >= 0 and e.actor_num_gpus >= 0, "eval.actor_num_cpus/actor_num_gpus must be >= 0")
    for i, g in enumerate(cfg.promotion.gates):
        where = f"promotion.gates[{i}] ({g.metric})"
        _check(g.max_regression is not None or g.min is not None or g.max is not None,
               f"{where} checks nothing: set max_regression, min or max")
        _check(g.max_regression is None or g.max_regression >= 0, f"{where}: max_regression must be >= 0")
        _check(g.min is None or g.max is None or g.min <= g.max, f"{where}: min must not exceed max")
    _check(len({g.metric for g in cfg.promotion.gates}) == len(cfg.promotion.gates),
           "promotion.gates: one gate per metric")
    _validate_serving(cfg)


def _validate_serving(cfg: Config) -> None:
    s, g = cfg.serve, cfg.generate
    _check(1 <= s.min_replicas <= s.max_replicas,
           f"serve.min_replicas/max_replicas = {s.min_replicas}/{s.max_replicas} must satisfy 1 <= min <= max")
    for key in ("ingress_replicas", "max_batch_size", "max_ongoing_requests", "max_pending_jobs", "retry_after_s",
                "max_prompt_chars", "max_body_bytes", "max_image_bytes", "max_image_side", "max_results_in_memory"):
        _check(getattr(s, key) >= 1, f"serve.{key} must be >= 1")
    _check(s.max_queued_requests >= 0, "serve.max_queued_requests must be >= 0")
    _check(s.max_ongoing_requests >= s.max_batch_size,
           f"serve.max_ongoing_requests = {s.max_ongoing_requests} must be >= serve.max_batch_size = "
           f"{s.max_batch_size} (a replica batches only the requests it holds)")
    _check(s.target_ongoing_requests > 0, "serve.target_ongoing_requests must be positive")
    _check(s.num_gpus >= 0 and s.num_cpus >= 0, "serve.num_gpus/num_cpus must be >= 0")
    _check(s.batch_wait_timeout_s >= 0 and s.alias_poll_s >= 0, "serve.batch_wait_timeout_s/alias_poll_s must be >= 0")
    _check(s.request_timeout_s > 0, "serve.request_timeout_s must be positive")
    _check(s.ingress_replicas == 1 or s.results_uri is not None,
           f"serve.ingress_replicas = {s.ingress_replicas} needs serve.results_uri (a folder or s3://): a job's "
           "status and video must be readable from every ingress replica")
    for key in ("actors", "batch_size", "part_rows"):
        _check(getattr(g, key) >= 1, f"generate.{key} must be >= 1")
    _check(g.num_gpus >= 0 and g.num_cpus >= 0, "generate.num_gpus/num_cpus must be >= 0")
    _check(g.seed >= 0, "generate.seed must be >= 0")
