import socket

import pytest
import torch

from w2svd.metrics.domain import DomainVideoEncoder
from w2svd.metrics.frechet import FrechetDistance
from w2svd.metrics.i3d import I3D_WEIGHTS_FILE, I3DFeatures, InceptionI3d
from w2svd.metrics.inception import INCEPTION_WEIGHTS_FILE, InceptionFeatures
from w2svd.metrics.weights import MissingWeightsError


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a metric tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("path", [None, "missing/dir/rgb_imagenet.pt"])
def test_missing_i3d_weights_name_the_file_and_never_download(tmp_path, no_network, path):
    with pytest.raises(FileNotFoundError) as err:
        I3DFeatures.from_path(None if path is None else tmp_path / path)
    assert isinstance(err.value, MissingWeightsError)
    assert I3D_WEIGHTS_FILE in str(err.value) and "never downloaded" in str(err.value)


def test_missing_inception_and_domain_weights_raise(tmp_path, no_network):
    with pytest.raises(MissingWeightsError, match=INCEPTION_WEIGHTS_FILE):
        InceptionFeatures.from_path(tmp_path / "nope.pt")
    with pytest.raises(MissingWeightsError, match="train_domain_encoder"):
        DomainVideoEncoder.from_path(tmp_path / "nope.safetensors")


def test_i3d_has_the_reference_size_and_loads_saved_weights(tmp_path, face_clips):
    from safetensors.torch import save_file

    net = InceptionI3d()
    # Inflated Inception-V1 with a 400-way head: 12.70 M parameters, as the Kinetics checkpoint.
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(12.7e6, rel=0.01)
    with torch.no_grad():
        for m in net.modules():  # non-trivial BN statistics, so a missed key would show in the output
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "i3d.safetensors")
    torch.save(net.state_dict(), tmp_path / I3D_WEIGHTS_FILE)
    clips = face_clips(B=2, T=8, H=16, W=16)
    ref = I3DFeatures(net, size=None)(clips)
    for path in (tmp_path / "i3d.safetensors", f"file://{tmp_path / I3D_WEIGHTS_FILE}"):
        feats = I3DFeatures.from_path(path, size=None)
        assert feats.training is False
        assert torch.allclose(feats(clips), ref, atol=1e-5)
    assert ref.shape == (2, 400) and I3DFeatures(net, feature="pool").num_features == 1024
    fd = FrechetDistance(I3DFeatures(net, size=None))
    fd.update(clips, real=True)
    fd.update(255 - clips, real=False)
    assert fd.compute() > 0.0


def test_inception_wrapper_calls_a_torchscript_detector(tmp_path):
    class FakeDetector(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            m = x.float().mean(dim=(2, 3))
            return torch.cat([m, m * m], dim=1)

    torch.jit.save(torch.jit.script(FakeDetector()), tmp_path / INCEPTION_WEIGHTS_FILE)
    net = InceptionFeatures.from_path(tmp_path / INCEPTION_WEIGHTS_FILE)
    frames = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    assert net.num_features == 6
    assert torch.allclose(net(frames)[:, :3], frames.float().mean(dim=(1, 2)))
