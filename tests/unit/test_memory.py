"""The memory planner's pieces on tiny cases with hand-written references, and its answers' shape
for the 13B configs. Agreement with a measurement: tests/train/test_memory_planner.py."""

import pytest
import torch

from pipelines import plan as plan_cli
from w2svd import memory
from w2svd.config import load_config
from w2svd.models.hunyuan import build_backbone
from w2svd.roles import CRITIC, DiscriminatorHead, adapter_parameters, add_lora


def test_partition_and_zero2_gradients_by_hand():
    assert memory.partition(10, 3) == 4 and memory.partition(9, 3) == 3 and memory.partition(1, 4) == 1
    # Group (3, 5, 2) over 2 ranks: partitions [0, 5) and [5, 10); rank 0 overlaps params 0 and 1
    # (3 + 5), rank 1 params 1 and 2 (5 + 2).
    assert memory.zero2_gradient_elements((3, 5, 2), 2) == 8
    assert memory.zero2_gradient_elements((3, 5, 2), 1) == 10
    # 3 ranks, P = 4: [0, 4) → params 0, 1 (8); [4, 8) → param 1 (5); [8, 12) → param 2 (2).
    assert memory.zero2_gradient_elements((3, 5, 2), 3) == 8
    assert memory.zero2_gradient_elements((4, 4), 2) == 4  # boundaries on parameter edges
    assert memory.zero2_gradient_elements((), 4) == 0


INV = memory.Inventory(base=(10, 6), critic_lora=(2, 2), generator_lora=(1, 1), disc=(3,))


def test_state_bytes_zero2_by_hand():
    s = memory.state_bytes(memory.layout(INV, "w2svd-full"), ranks=2, zero_stage=2, weight_bytes=4,
                           bucket_elements=100)
    assert s.parameters == (10 + 6 + 2 + 2 + 3 + 10 + 6) * 4  # teacher + LoRA + head + generator copy
    # critic: LoRA group (2, 2) → 2 per rank, head (3,) → the whole 3 on both; generator (10, 6):
    # partitions [0, 8) and [8, 16), the second overlaps both parameters.
    assert s.gradients == ((2 + 3) * 4, 16 * 4)
    assert s.optimizer == 12 * ((2 + 2) + 8)  # fp32 master + 2 moments of ⌈T/N⌉ per group
    assert (s.buckets, s.buckets_held) == (100 * 4, False)  # one, during a backward
    assert s.step_transient == (3 * 4 * 2, 3 * 4 * 8)  # 3 fp32 copies of the largest group partition


def test_state_bytes_zero3_by_hand():
    s = memory.state_bytes(memory.layout(INV, "w2svd-full"), ranks=2, zero_stage=3, weight_bytes=2,
                           bucket_elements=100)
    assert s.parameters == ((5 + 3 + 1 + 1 + 2) + (5 + 3)) * 2  # each parameter split, padded
    assert s.gradients == ((1 + 1 + 2) * 2, (5 + 3) * 2)
    assert (s.buckets, s.buckets_held) == (2 * 100 * 2, True)  # one per engine, allocated once
    persistent = memory.state_bytes(memory.layout(INV, "w2svd-full"), 2, 3, 2, persistence=3, bucket_elements=100)
    assert persistent.parameters - s.parameters == (2 + 2 + 3) * 2  # small parameters also kept whole
    # DMD2's frozen teacher is in no engine: whole on every rank even under ZeRO-3.
    d = memory.state_bytes(memory.layout(INV, "dmd2"), 2, 3, 2, bucket_elements=100)
    assert d.parameters == (16 + (5 + 3 + 2) + (5 + 3)) * 2


def test_generator_ema_is_an_fp32_copy_of_the_generators_trained_share():
    """pipelines/ema.py keeps ``local_values(p).float()`` of each generator parameter: the whole
    parameter under ZeRO-2, this rank's partition under ZeRO-3; nothing without EMA."""
    full = memory.layout(INV, "w2svd-full")
    assert memory.state_bytes(full, 2, 2, 2, bucket_elements=100).ema == 0
    assert memory.state_bytes(full, 2, 2, 2, bucket_elements=100, ema=True).ema == (10 + 6) * 4
    assert memory.state_bytes(full, 2, 3, 2, bucket_elements=100, ema=True).ema == (5 + 3) * 4
    lora = memory.layout(INV, "w2svd-lora")  # the generator trains its LoRA only
    assert memory.state_bytes(lora, 2, 2, 2, bucket_elements=100, ema=True).ema == (1 + 1) * 4
    with_ema, without = (memory.plan(load_config("debug", [f"method.generator_ema={d}"]), 1, 1e6, with_max_batch=False)
                         for d in (0.9, 0.0))
    assert with_ema.peak() - without.peak() == with_ema.state.ema > 0


def test_inventory_counts_the_models_the_roles_build():
    cfg = load_config("debug")
    inv = memory.inventory(cfg)
    teacher = build_backbone(cfg.model)
    assert inv.base == tuple(p.numel() for p in teacher.parameters())
    add_lora(teacher, CRITIC, cfg.method.lora_rank, cfg.method.lora_alpha, cfg.method.lora_targets)
    assert inv.critic_lora == tuple(p.numel() for p in adapter_parameters(teacher, CRITIC))
    assert inv.disc == tuple(p.numel() for p in DiscriminatorHead(teacher.feature_dim).parameters())


def test_activation_features_by_hand():
    s = memory.Shape(batch=2, latent_frames=3, latent_height=8, latent_width=6, text_tokens=16, hidden=16, heads=2,
                     mlp_ratio=2.0, dual_blocks=1, single_blocks=3, refiner_blocks=1, lora_rank=4,
                     dual_block_elements=100, patch=2, patch_t=1, latent_channels=16)
    nv = 3 * 4 * 3
    n = nv + 16
    assert s.video_tokens == nv
    assert memory.activation_features(s, "w2svd-full") == [
        2 * n * 16 * 1, 2 * n * 2 * 16 * 1, 2 * n * 16 * 3, 2 * n * 2 * 16 * 3, 2 * n * 2 * 4, 2 * n * 16,
        2 * n * 2 * 16, 2 * nv * 64, 2 * 16 * 16 * 1, 2 * n * 4 * 4, 0, 2, 1.0]
    dmd2 = memory.activation_features(s, "dmd2")
    assert dmd2[9] == 0  # no adapter on DMD2's fake score
    assert dmd2[10] == 100  # its trained dual-stream blocks get a second, summed weight gradient


def test_activations_grow_linearly_with_the_batch():
    cfg = load_config("debug")
    acts = [memory.step_activations(cfg, "w2svd-full", "float32", batch=b)["generator"][True] for b in (1, 2, 3)]
    assert acts[2] - acts[1] == pytest.approx(acts[1] - acts[0])


@pytest.mark.parametrize("config", ["hunyuan-t2v-13b", "hunyuan-i2v-13b"])
def test_13b_state_against_the_physical_limits(config):
    """bf16 weights, bf16 gradients, fp32 master + Adam: per parameter of the base, DMD2 holds 3
    copies and trains 2, W2SVD (full) holds 2 and trains 1, shared-base holds 1 plus adapters:
    (2·2 + 1·14) / (3·2 + 2·14) = 0.53 and under 0.1 (no sharding, one GPU)."""
    def state(method):
        p = memory.plan(load_config(config, memory.METHODS[method]), 1, 1e6, zero_stage=2, with_max_batch=False)
        return p.parameters + p.gradients + p.optimizer

    dmd2 = state("dmd2")
    assert state("w2svd-full") / dmd2 == pytest.approx(18 / 34, rel=0.02)
    assert state("w2svd-lora") / dmd2 < 0.1
    base = sum(memory.inventory(load_config(config)).base)
    assert 12.5e9 < base < 13.5e9  # HunyuanVideo's transformer is 13B


def test_more_gpus_never_need_more_memory_and_smallest_count_fits():
    cfg = load_config("hunyuan-t2v-13b", ["data.buckets=[{name: p, frames: 33, height: 544, width: 960}]"])
    peaks = [memory.plan(cfg, n, 80, with_max_batch=False).peak() for n in (1, 2, 8, 64)]
    assert peaks == sorted(peaks, reverse=True)
    n = memory.smallest_gpus(cfg, 80, reserve_gib=3)
    assert n is not None and memory.plan(cfg, n, 80, reserve_gib=3).fits
    assert n == 1 or not memory.plan(cfg, n - 1, 80, reserve_gib=3).fits


def test_plan_command_prints_a_table_and_refuses_bad_input(capsys):
    assert plan_cli.main(["--config", "debug", "--gpus", "2", "--gpu-mem-gib", "4", "--reserve-gib", "1"]) == 0
    out = capsys.readouterr().out
    for label in ("weights", "gradients", "optimizer", "activations, critic step", "largest batch per GPU",
                  "smallest number of 4 GiB GPUs", memory.METHOD_LABELS["w2svd-lora"][:25]):
        assert label in out, label
    assert plan_cli.main(["--config", "debug", "--gpus", "0", "--gpu-mem-gib", "4"]) == 2
    assert plan_cli.main(["--config", "debug", "--gpus", "2", "--gpu-mem-gib", "4", "--method", "lcm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "w2svd plan: error" in err


def test_meta_inventory_allocates_nothing():
    before = torch.randn(1).untyped_storage().nbytes()  # noqa: F841 - warms the allocator
    inv = memory.inventory(load_config("hunyuan-t2v-13b"))
    assert sum(inv.base) > 1e10  # counted on the meta device: no 26 GB were needed
