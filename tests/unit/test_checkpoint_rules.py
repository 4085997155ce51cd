"""Checkpoint rules that need no cluster: strict restore, rollback target, EMA, collectives' device."""

import json

import pytest
import torch

from pipelines import checkpoint
from pipelines.collectives import backend_device
from pipelines.ema import WeightEMA
from pipelines.engines import Trained, param_stats


def role(name: str, *params: torch.Tensor) -> Trained:
    return Trained(name, engine=None, optimizer=None, lrs=[], params=[torch.nn.Parameter(p) for p in params])


def test_param_stats_count_sums_squares_and_non_finite_values():
    a, b = torch.tensor([1.0, -2.0, float("nan")]), torch.tensor([[3.0, float("inf")]])
    stats = param_stats([a, b])
    assert stats.tolist() == [[-1.0, 5.0, 1.0], [3.0, 9.0, 1.0]]
    with pytest.raises(checkpoint.NonFiniteParameters, match=r"critic has non-finite values in parameters \[0, 1\]"):
        checkpoint.check_finite([role("critic", a, b)], step=7)


def test_restore_is_strict_about_every_trained_parameter():
    saved = role("generator", torch.randn(4, 3), torch.randn(5))
    recorded = checkpoint.fingerprints([saved])
    checkpoint.check_restored([saved], recorded, "ckpt")  # what was saved: fine
    with torch.no_grad():
        saved.params[1][2] += 0.5  # one value not restored (a key DeepSpeed skipped)
    with pytest.raises(RuntimeError, match=r"role 'generator' parameters \[1\] were not restored"):
        checkpoint.check_restored([saved], recorded, "ckpt")
    with pytest.raises(RuntimeError, match="no state for the trained role 'critic'"):
        checkpoint.check_restored([role("critic", torch.zeros(2))], recorded, "ckpt")


def _fake_run(root, in_band_by_step: dict[int, bool]):
    for step, in_band in in_band_by_step.items():
        folder = root / checkpoint.dir_name(step)
        folder.mkdir(parents=True)
        (folder / checkpoint.STATE_FILE).write_text(json.dumps({"step": step, "in_band": in_band}))
    return str(root)


def test_a_rollback_resumes_from_the_newest_checkpoint_written_in_band(tmp_path):
    run = _fake_run(tmp_path / "a", {2: True, 4: True, 6: False, 8: False})
    assert checkpoint.newest_in_band(run, None).endswith("checkpoint_step00000004")
    assert checkpoint.newest_in_band(run, None, before=4).endswith("checkpoint_step00000002")
    assert checkpoint.newest_in_band(_fake_run(tmp_path / "b", {2: False}), None) is None
    assert checkpoint.newest_in_band(_fake_run(tmp_path / "c", {10: True, 9: True}), None).endswith("step00000010")


def test_generator_ema_follows_its_equation_and_swaps_in_for_a_block():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = WeightEMA([p], decay=0.5)
    for value in (1.0, 3.0):
        with torch.no_grad():
            p.fill_(value)
        ema.update()
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.5 * (0.5 * 0 + 0.5 * 1) + 0.5 * 3))
    with ema.applied():
        torch.testing.assert_close(p.detach(), torch.full((3,), 1.75))
    torch.testing.assert_close(p.detach(), torch.full((3,), 3.0))  # its own values back
    other = WeightEMA([torch.nn.Parameter(torch.ones(3))], decay=0.5)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="other parameter partitions"):
        WeightEMA([torch.nn.Parameter(torch.ones(4))], 0.5).load_state_dict(ema.state_dict())


def test_collectives_use_the_backends_device():
    assert backend_device("gloo").type == "cpu"
    if torch.cuda.is_available():
        assert backend_device("nccl").type == "cuda"


def test_ema_shares_of_another_world_reassemble():
    # Whole parameters (ZeRO <= 2): every rank holds the same shadow, rank 0's is taken.
    p = torch.nn.Parameter(torch.zeros(2, 3))
    ema = WeightEMA([p], decay=0.5)
    shares = [{"decay": 0.5, "shadow": [torch.full((2, 3), 7.0)]}, {"decay": 0.5, "shadow": [torch.full((2, 3), 7.0)]}]
    ema.load_shares(shares)
    torch.testing.assert_close(ema.shadow[0], torch.full((2, 3), 7.0))
    # A ZeRO-3 parameter of 5 values kept by 2 ranks as 3 + 2 values; now one rank holds all 5.
    q = torch.nn.Parameter(torch.zeros(5))
    q.ds_tensor, q.ds_numel = torch.zeros(5), 5
    ema = WeightEMA([q], decay=0.5)
    ema.load_shares([{"shadow": [torch.tensor([1.0, 2.0, 3.0])]}, {"shadow": [torch.tensor([4.0, 5.0])]}])
    torch.testing.assert_close(ema.shadow[0], torch.arange(1.0, 6.0))


def test_finiteness_reads_a_zero3_partition_not_the_empty_parameter():
    # Under ZeRO-3 a parameter's own data is empty between forwards; its values are in
    # ds_tensor (this rank's partition, padded). A NaN there must stop the checkpoint.
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_tensor, p.ds_numel = torch.tensor([1.0, float("nan"), 0.0]), 2  # 2 values + 1 padding
    assert param_stats([p])[0, 2] == 1
    with pytest.raises(checkpoint.NonFiniteParameters):
        checkpoint.check_finite([Trained("generator", None, None, [], [p])], step=3)
    p.ds_tensor = torch.tensor([1.0, 2.0, float("nan")])  # a NaN in the padding is not a value
    assert param_stats([p]).tolist() == [[3.0, 5.0, 0.0]]
