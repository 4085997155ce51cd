"""The config tree's schema: one dataclass per section, with the allowed values as types.

``w2svd.config`` reads YAML into these (``load_config``), checking every key against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# PEFT regex over the dual/single-stream attention projections of HunyuanVideo; a plain
# ["to_q", ...] list would also hit the text token refiner.
HUNYUAN_LORA_TARGETS = (
    r".*transformer_blocks\.\d+\.attn\."
    r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
)


@dataclass
class TransformerArch:
    """Sizes of diffusers' HunyuanVideoTransformer3DModel, used when building random weights."""

    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    guidance_embeds: bool = True
    image_condition_type: str | None = None


@dataclass
class VAEArch:
    latent_channels: int = 16
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986
    # 8 is the 13B VAE's; the self-trained portrait world uses 4 (a milder compression that a
    # small VAE trained on CPU can reconstruct).
    spatial_compression_ratio: int = 8
    mid_block_add_attention: bool = True


@dataclass
class ModelConfig:
    family: Literal["hunyuan-t2v", "hunyuan-i2v"] = "hunyuan-t2v"
    # A diffusers folder (or a finetune export) holding the teacher transformer, local or s3://.
    # None builds random weights from ``arch`` (tiny configs only).
    teacher: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    text_encoder_2: str | None = None
    arch: TransformerArch = field(default_factory=TransformerArch)
    vae_arch: VAEArch = field(default_factory=VAEArch)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    text_max_length: int = 256
    # Tokenizer of the tiny random-init text encoders (no model.text_encoder): "bytes" (UTF-8
    # bytes) or "words" (one id per word, so a short max length still covers every word of a
    # caption and captions differing in one word differ in one token).
    text_tokenizer: Literal["bytes", "words"] = "bytes"
    seed: int = 0


@dataclass
class MethodConfig:
    name: Literal["w2svd", "dmd2", "lcm", "euler"] = "w2svd"
    student_steps: int = 4
    alpha_weak: float = 0.1
    alpha_strong: float = 1.0
    # "full": the generator is a trainable copy of the teacher; "lora": an adapter on the shared base.
    generator: Literal["full", "lora"] = "full"
    lora_rank: int = 64
    lora_alpha: float = 64.0
    generator_lora_rank: int = 64
    lora_targets: str = HUNYUAN_LORA_TARGETS
    # The 4-step recipe chosen by the toy family study's second round (docs/benchmarks.md, "Toy
    # family"): critic-to-generator ratio 5, no critic warm-up, generator EMA 0.99, GAN weight
    # 0.005, backward simulation, the data-forcing reg term at 0.25, α_weak 0.1, cosine generator
    # rate (optim.generator_lr_schedule).
    gen_update_every: int = 5
    # Critic-only iterations before the first generator update (w2svd.iteration.Cadence).
    critic_warmup: int = 0
    sigma_min: float = 0.02
    sigma_max: float = 0.98
    shift: float = 7.0
    # Guidance given to the real score: "embedded" (HunyuanVideo T2V), "cfg", or "none".
    guidance: Literal["embedded", "cfg", "none"] = "embedded"
    guidance_scale: float = 6.0
    # Guidance scale of the fake score and of the generator; 1.0 is "no guidance".
    fake_guidance_scale: float = 1.0
    lambda_dmd: float = 1.0
    lambda_reg: float = 0.25
    lambda_gan_gen: float = 0.005
    lambda_gan_disc: float = 1e-2
    backward_simulation: bool = True
    # The reg term's target: "paper" (x_gt) or "data_forcing" (the real score's x0 on noised x_gt).
    reg_target: Literal["paper", "data_forcing"] = "data_forcing"
    sampler: Literal["renoise", "euler"] = "renoise"
    generator_ema: float = 0.99
    # LCM: the teacher grid that consistency pairs are drawn from, and the target EMA.
    lcm_teacher_steps: int = 28
    lcm_target_ema: float = 0.95
    # Teacher Euler sampling steps (the reference and the naive few-step baselines).
    teacher_steps: int = 28


@dataclass
class BucketConfig:
    name: str
    frames: int
    height: int
    width: int


@dataclass
class DataConfig:
    fps: float = 24.0
    buckets: list[BucketConfig] = field(
        default_factory=lambda: [
            BucketConfig("portrait-540", 129, 960, 544),
            BucketConfig("landscape-540", 129, 544, 960),
        ]
    )
    caption_file: str = "captions.jsonl"
    min_frames: int = 9
    min_side: int = 64
    max_bytes: int = 2_000_000_000
    max_seconds: float = 600.0
    shuffle_seed: int = 0
    # Pre-encode: S3-compatible endpoint (else AWS_ENDPOINT_URL), clips per shard, clips per
    # encoder call (at most encode_batch_size, and as many of the largest bucket as
    # encode_batch_pixels = frames × height × width holds; 0: no pixel budget), clips per decode
    # task, encoder actors and their resources (GPUs are used only when the cluster has them;
    # torch threads = CPUs reserved), CPUs per decode task (= FFmpeg threads), VAE tiling for
    # large frames, reference-frame latents.
    s3_endpoint: str | None = None
    shard_rows: int = 64
    encode_batch_size: int = 4
    encode_batch_pixels: int = 0
    decode_batch_size: int = 1
    encoder_pool_size: int = 1
    encoder_num_gpus: float = 1.0
    encoder_num_cpus: float = 1.0
    decode_num_cpus: float = 0.5
    vae_tiling: bool = False
    encode_reference: bool = True


@dataclass
class OptimConfig:
    steps: int = 2000
    batch_size: int = 1
    generator_lr: float = 2e-6
    critic_lr: float = 2e-5
    disc_lr: float = 2e-5
    # The generator's rate over its updates: "constant" or "cosine" (to 0 at the last update).
    generator_lr_schedule: Literal["constant", "cosine"] = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    log_every: int = 10
    sample_every: int = 200
    seed: int = 0
    # Validation samples: how many, from which fixed noise seed (prompts: the first batch of the data).
    sample_count: int = 2
    sample_seed: int = 1234
    # Fine-tune only: 0 trains every weight of the teacher, > 0 a LoRA of that rank (merged on export).
    finetune_lora_rank: int = 0
    finetune_lr: float = 1e-5
    # Fine-tune only: AdamW's betas. Flow matching wants momentum; optim.betas' β1 = 0 is
    # DMD2's choice for the adversarial distillation roles.
    finetune_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # Fine-tune only: the conditions dropped so the teacher also learns the unconditional score (CFG).
    finetune_uncond_prob: float = 0.1
    # Fine-tune only: the shift applied to the logit-normal training sigmas (null: method.shift, the
    # shift the teacher is sampled with). Unshifted, sigmas above 0.95 are 0.2 % of the draws, and
    # a sampler starting at sigma 1 begins where the teacher never learned (docs/benchmarks.md,
    # "Portrait world").
    finetune_sigma_shift: float | None = None
    # Fine-tune only: the density the training sigmas are drawn from before the shift,
    # logit_normal (SD3's) or uniform (more draws near sigma 1; w2svd.schedule.sample_training_sigmas).
    finetune_sigma_density: Literal["logit_normal", "uniform"] = "logit_normal"
    # Fine-tune only: the decay of an EMA of the teacher's trained weights, which the export
    # holds (0: the last weights). On the portrait world it scored as the last weights did
    # (docs/benchmarks.md, "Portrait world": the teacher probes), so the world keeps it off.
    finetune_ema: float = 0.0


@dataclass
class HealthConfig:
    enabled: bool = True
    # Consecutive checks out of band before a rollback.
    patience: int = 3
    max_rollbacks: int = 2
    lr_decay_on_rollback: float = 0.5
    # Band on the generator's sample standard deviation, relative to the data's.
    sample_std_band: list[float] = field(default_factory=lambda: [0.2, 5.0])
    # Any loss above this (e.g. a diverging fake-score loss) counts as out of band.
    loss_max: float = 1.0e4
    # The drift guard (w2svd.drift.DriftGuard): a training-only signal against its running best,
    # checked every drift_every steps; rollbacks share max_rollbacks and lr_decay_on_rollback.
    # Signal, band and action as the toy family study's third round chose them for what a run
    # ends with (bench/toy_family_guard.py): on its test runs, stopping at the firing and keeping
    # the best state by the signal ended 1.075x above the curve's best instead of 1.257x, with 6 %
    # of steady runs stopped (docs/benchmarks.md, "Third round"). Its warmup and patience count
    # checks of 5 generator updates: drift_every null checks every 5 × method.gen_update_every
    # steps at any critic ratio. The guard cannot fire before drift_every × (max(warmup, 1) + patience).
    drift_enabled: bool = True
    drift_signal: Literal["proj_gap", "disc_acc", "score_gap", "critic_loss"] = "proj_gap"
    drift_rise: float = 0.1
    drift_margin: float = 0.0
    drift_patience: int = 8
    drift_warmup: int = 10
    drift_smoothing: float = 0.8
    drift_action: Literal["rollback", "stop", "log"] = "stop"
    drift_every: int | None = None
    # proj_gap compares the last drift_window training batches with the generator's samples for
    # their conditions, drawn at those steps (the study's window of 8 batches): the state now, not
    # the run's history. Costs drift_window student samplings per check.
    drift_window: int = 8


@dataclass
class ParallelConfig:
    num_workers: int = 8
    use_gpu: bool = True
    cpus_per_worker: float = 1.0
    zero_stage: int = 3
    precision: Literal["fp32", "bf16"] = "bf16"
    max_failures: int = 3
    # Read the latent Dataset once into the object store (small data sets; no re-read per epoch).
    materialize_data: bool = False
    # ZeRO-3 keeps parameters with fewer elements than this whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold); 0 partitions every parameter.
    zero3_persistence_threshold: int = 100_000


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None
    experiment: str = "w2svd"
    registered_model: str = "w2svd-generator"
    system_metrics: bool = True
    # Validation videos every optim.sample_every steps (mp4 artifacts samples/step_NNNNNN.mp4).
    log_samples: bool = True


@dataclass
class EvalConfig:
    """The fixed evaluation set (synthetic portrait prompts, references and seeds) and how the
    evaluation job runs. Changing any evaluation-set field changes the set's fingerprint, and
    numbers are only compared between evaluations of the same fingerprint."""

    num_prompts: int = 16
    # Item i uses noise seed ``seed + i`` and the synthetic factors of rng([factor_seed, i]).
    seed: int = 1000
    factor_seed: int = 2024
    num_frames: int = 33
    height: int = 128
    width: int = 96
    fps: float = 8.0
    # A DomainVideoEncoder .safetensors (path or s3://) for domain FVD; None trains a small one
    # on synthetic clips (deterministic, cached under $W2SVD_CACHE_DIR or ~/.cache/w2svd).
    domain_encoder: str | None = None
    domain_train_clips: int = 32
    domain_train_steps: int = 150
    domain_num_features: int = 16
    # Ray Data: generator actors (each holds one model), metric actors, clips per batch.
    generator_actors: int = 1
    metric_actors: int = 1
    batch_size: int = 4
    actor_num_cpus: float = 1.0
    actor_num_gpus: float = 0.0


@dataclass
class GateConfig:
    """One promotion gate on one metric of the evaluation report.

    ``max_regression``: relative to the champion, the challenger may be worse by at most this
    fraction of the champion's value (skipped when there is no champion). ``min``/``max``:
    absolute bounds, checked always (they are what a first version must pass)."""

    metric: str
    better: Literal["lower", "higher"]
    max_regression: float | None = None
    min: float | None = None
    max: float | None = None


@dataclass
class PromotionConfig:
    gates: list[GateConfig] = field(
        default_factory=lambda: [
            GateConfig("fvd/domain", "lower", max_regression=0.10),
            GateConfig("dynamic_degree", "higher", min=0.3),
            GateConfig("temporal_flickering", "higher", max_regression=0.02, min=0.9),
            GateConfig("face_detection_rate", "higher", max_regression=0.05, min=0.5),
        ]
    )


@dataclass
class WorldConfig:
    """``w2svd world build``: the self-trained parts of a portrait world (``w2svd/world.py``).

    The VAE trains on synthetic portrait clips rendered at the first bucket's size (random crops
    of ``vae_crop`` = frames, height, width) and is accepted when its PSNR on clips of disjoint
    seeds reaches ``vae_min_psnr``; the teacher is fine-tuned by the ``finetune`` job on
    ``data_clips`` pre-encoded clips. Everything is cached under the hash of these settings."""

    seed: int = 0
    vae_clips: int = 64
    vae_test_clips: int = 8
    vae_steps: int = 1500
    vae_batch_size: int = 4
    vae_crop: list[int] = field(default_factory=lambda: [5, 32, 32])
    vae_lr: float = 4e-4
    vae_kl_weight: float = 1e-6
    vae_min_psnr: float = 28.0
    data_clips: int = 128
    teacher_steps: int = 1500
    teacher_lr: float = 3e-4
    teacher_batch_size: int = 4


@dataclass
class DebugConfig:
    """Fault injection for the tests of resume and rollback; never set on a real run."""

    # Rank 1 (or 0 with one worker) raises at this step of a fresh run (-1 = never).
    fail_at_step: int = -1
    # Every loss of this step is NaN, once per run (-1 = never).
    nan_at_step: int = -1
    # Pre-encode: the shard writer SIGKILLs the driver once the output holds this many shards
    # (0 = never), so the kill lands mid-stream however far Ray Data ran ahead.
    kill_preencode_after_shards: int = 0
    # Batch generation: the driver SIGKILLs itself once this many rows are recorded (0 = never).
    kill_generate_after_rows: int = 0


@dataclass
class ServeConfig:
    """The Ray Serve application (``w2svd serve``, ``pipelines.serve:build_app``)."""

    # Generator replicas: fixed at min_replicas, or autoscaled up to max_replicas on the ongoing
    # requests per replica when max_replicas > min_replicas.
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    ingress_replicas: int = 1
    # Same-shape requests share one sampler call (up to max_batch_size); 1 turns batching off.
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05
    # Backpressure: requests a generator replica holds, and requests a caller may queue for the
    # generators beyond that; anything more is answered 503 with Retry-After.
    max_ongoing_requests: int = 8
    max_queued_requests: int = 8
    # Unfinished jobs an ingress replica accepts before it answers 503.
    max_pending_jobs: int = 64
    request_timeout_s: float = 600.0
    retry_after_s: int = 5
    # Request limits (anything beyond is a 4xx naming the field).
    max_prompt_chars: int = 2000
    max_body_bytes: int = 16_000_000
    max_image_bytes: int = 10_000_000
    max_image_side: int = 4096
    # Finished jobs (status + mp4) are also written here (a folder or s3://), so any ingress
    # replica, or one restarted, still answers for them; None keeps them in memory only.
    results_uri: str | None = None
    max_results_in_memory: int = 256
    # Seconds between checks of a models:/NAME@ALIAS for a moved alias (0 = never).
    alias_poll_s: float = 60.0
    # Bearer-token auth: the token is read from this environment variable or this file (never
    # from a config); with neither set, the API is open.
    auth_token_env: str = "W2SVD_SERVE_TOKEN"
    auth_token_file: str | None = None
    codec: Literal["libx264", "mpeg4"] = "libx264"


@dataclass
class GenerateConfig:
    """Batch generation (``w2svd generate``): a Ray Data actor pool over a prompt table."""

    actors: int = 1
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    batch_size: int = 4
    # Results are recorded every part_rows rows: at most that many are redone after a kill.
    part_rows: int = 8
    # A row without a seed gets seed + its row number, so a rerun draws the same video.
    seed: int = 0
    codec: Literal["libx264", "mpeg4"] = "libx264"


@dataclass
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
