"""HunyuanVideo backbone adapter at tiny debug sizes on CPU (T2V and latent-concat I2V)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from w2svd.config import HUNYUAN_LORA_TARGETS, load_config
from w2svd.models import build_backbone, capture_features, save_backbone
from w2svd.models.hunyuan import HunyuanVideoBackbone, count_parameters, dummy_cond

B, C, T, H, W = 2, 16, 3, 8, 6
L = 5


def t2v_cfg():
    return load_config("debug").model


def i2v_cfg():
    model = t2v_cfg()
    arch = dataclasses.replace(model.arch, in_channels=2 * C + 1, guidance_embeds=False,
                               image_condition_type="latent_concat")
    return dataclasses.replace(model, family="hunyuan-i2v", arch=arch)


@pytest.fixture(scope="module")
def t2v():
    return build_backbone(t2v_cfg()).eval()


@pytest.fixture(scope="module")
def i2v():
    return build_backbone(i2v_cfg()).eval()


def inputs(image=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_BCTHW = torch.randn(B, C, T, H, W, generator=g)
    sigma_B = torch.tensor([0.3, 0.9])
    ref = torch.randn(B, C, 1, H, W, generator=g) if image else None
    return x_BCTHW, sigma_B, dummy_cond(t2v_cfg(), B, L, generator=g, image_latent=ref)


@torch.no_grad()
def test_t2v_forward_shape_and_finite(t2v):
    x, s, cond = inputs()
    v = t2v(x, s, cond)
    assert v.shape == x.shape and v.dtype == x.dtype
    assert torch.isfinite(v).all()
    assert t2v.guidance_embedded and not t2v.image_conditioned
    assert t2v.feature_dim == 2 * 8
    # The timestep reaches the network: another sigma gives another velocity.
    assert not torch.allclose(v, t2v(x, s.flip(0), cond))


@torch.no_grad()
def test_t2v_guidance_is_embedded_and_defaults_to_scale_one(t2v):
    x, s, cond = inputs()
    v_default = t2v(x, s, cond)
    v_one = t2v(x, s, cond, guidance_B=torch.full((B,), 1000.0))
    v_six = t2v(x, s, cond, guidance_B=torch.full((B,), 6000.0))
    torch.testing.assert_close(v_default, v_one)
    assert (v_six - v_one).abs().max() > 1e-4


@torch.no_grad()
def test_i2v_forward_depends_on_reference_latent(i2v):
    assert i2v.transformer.config.in_channels == 2 * C + 1
    assert not i2v.guidance_embedded and i2v.image_conditioned
    x, s, cond = inputs(image=True)
    v = i2v(x, s, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    other = dataclasses.replace(cond, image=torch.randn_like(cond.image))
    assert (i2v(x, s, other) - v).abs().max() > 1e-4


@torch.no_grad()
def test_i2v_input_matches_diffusers_latent_concat(i2v):
    """What the transformer sees equals HunyuanVideoImageToVideoPipeline's latent_model_input."""
    x, s, cond = inputs(image=True)
    seen = []
    handle = i2v.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["hidden_states"]), with_kwargs=True)
    try:
        i2v(x, s, cond)
    finally:
        handle.remove()
    # The pipeline: image latent repeated over frames, frames 1.. zeroed; mask ones at frame 0.
    image_latents = cond.image.repeat(1, 1, T, 1, 1)
    image_latents[:, :, 1:] = 0
    mask = image_latents.new_ones(B, 1, T, H, W)
    mask[:, :, 1:] = 0
    torch.testing.assert_close(seen[0], torch.cat([x, image_latents, mask], dim=1), rtol=0, atol=0)


def test_misuse_fails_clearly(t2v, i2v):
    x, s, cond = inputs()
    with pytest.raises(ValueError, match="cond.image"):
        i2v(x, s, cond)
    with pytest.raises(ValueError, match="guidance"):
        i2v(x, s, inputs(image=True)[2], guidance_B=torch.full((B,), 1000.0))
    with pytest.raises(ValueError, match="channels"):
        t2v(x[:, :4], s, cond)
    with pytest.raises(ValueError, match="hunyuan-i2v"):
        build_backbone(dataclasses.replace(t2v_cfg(), family="hunyuan-i2v"), device="meta")


def test_capture_features_and_backprop(t2v):
    x, s, cond = inputs()
    with capture_features(t2v) as feats:
        t2v(x, s, cond)
    assert len(feats) == 1
    tokens = T * (H // 2) * (W // 2)
    assert feats[0].shape == (B, tokens, t2v.feature_dim)
    t2v.zero_grad(set_to_none=True)
    feats[0].square().mean().backward()
    block = t2v.transformer.transformer_blocks[-1]
    assert block.attn.to_q.weight.grad is not None and block.attn.to_q.weight.grad.abs().sum() > 0
    assert t2v.transformer.x_embedder.proj.weight.grad.abs().sum() > 0
    # After the tap: the output projection played no part in the feature loss.
    assert t2v.transformer.proj_out.weight.grad is None
    t2v.zero_grad(set_to_none=True)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_backbone(t2v_cfg()), build_backbone(t2v_cfg())
    assert torch.equal(state, torch.get_rng_state())
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = build_backbone(dataclasses.replace(t2v_cfg(), seed=1))
    assert not torch.equal(a.transformer.proj_out.weight, c.transformer.proj_out.weight)


def test_dtype_and_gradient_checkpointing_are_honoured():
    model = dataclasses.replace(t2v_cfg(), dtype="bfloat16", gradient_checkpointing=True)
    bb = build_backbone(model)
    assert bb.transformer.dtype == torch.bfloat16 and bb.transformer.gradient_checkpointing
    x, s, cond = inputs()
    v = bb(x, s, cond)  # fp32 latents in, fp32 velocity out
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert bb.transformer.transformer_blocks[0].attn.to_q.weight.grad is not None


@torch.no_grad()
@pytest.mark.parametrize("layout", ["transformer", "model_folder"])
def test_save_then_build_from_folder_is_identical(tmp_path, i2v, layout):
    x, s, cond = inputs(image=True)
    out = tmp_path / "export"
    save_dir = out if layout == "transformer" else out / "transformer"
    save_backbone(i2v, save_dir)
    assert (save_dir / "config.json").is_file()
    assert (save_dir / "diffusion_pytorch_model.safetensors").is_file()
    loaded = build_backbone(dataclasses.replace(i2v_cfg(), teacher=str(out)))
    assert isinstance(loaded, HunyuanVideoBackbone)
    torch.testing.assert_close(loaded(x, s, cond), i2v(x, s, cond), rtol=0, atol=0)


def test_missing_teacher_names_the_path(tmp_path):
    missing = tmp_path / "no-such-teacher"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_backbone(dataclasses.replace(t2v_cfg(), teacher=str(missing)))
    empty = tmp_path / "empty"
    (empty / "transformer").mkdir(parents=True)
    (empty / "transformer" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        build_backbone(dataclasses.replace(t2v_cfg(), teacher=str(empty)))


def test_save_refuses_unmerged_adapter(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    bb = build_backbone(t2v_cfg())
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=HUNYUAN_LORA_TARGETS), bb.transformer)
    with pytest.raises(ValueError, match="PEFT"):
        save_backbone(bb, tmp_path / "export")


def test_lora_targets_hit_only_dual_and_single_stream_attention():
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    bb = build_backbone(t2v_cfg())
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=HUNYUAN_LORA_TARGETS),
                            bb.transformer, adapter_name="critic")
    wrapped = sorted(n for n, m in bb.transformer.named_modules() if isinstance(m, LoraLayer))
    assert not [n for n in wrapped if "context_embedder" in n or "refiner" in n]
    dual = {n for n in wrapped if n.startswith("transformer_blocks.")}
    single = {n for n in wrapped if n.startswith("single_transformer_blocks.")}
    assert dual == {f"transformer_blocks.0.attn.{p}" for p in (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    # Single-stream blocks have joint q/k/v and no output projection inside attn.
    assert single == {f"single_transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")}
    assert set(wrapped) == dual | single
    # The wrapped model still runs and the adapter (zero-initialised B) leaves it unchanged.
    x, s, cond = inputs()
    with torch.no_grad():
        assert torch.isfinite(bb(x, s, cond)).all()


def test_13b_builds_on_meta_without_allocating():
    # teacher=None: the structure from model.arch, no weights read.
    t2v = build_backbone(load_config("hunyuan-t2v-13b", ["model.teacher=null"]).model, device="meta")
    n = count_parameters(t2v)
    assert 12e9 < n < 13.5e9, n
    assert all(p.is_meta for p in t2v.parameters())
    assert t2v.transformer.dtype == torch.bfloat16 and t2v.guidance_embedded
    assert t2v.feature_dim == 24 * 128

    i2v = build_backbone(load_config("hunyuan-i2v-13b", ["model.teacher=null"]).model, device="meta")
    assert i2v.transformer.x_embedder.proj.weight.shape[1] == 33
    assert i2v.image_conditioned and not i2v.guidance_embedded
    assert i2v.latent_channels == 16


@torch.no_grad()
def test_build_from_s3_prefix_via_endpoint(tmp_path, monkeypatch, t2v):
    """An s3:// teacher is copied into the cache through AWS_ENDPOINT_URL, then loads identically."""
    import socket

    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        export = save_backbone(t2v, tmp_path / "export" / "transformer")
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="teachers")
        for path in export.iterdir():
            s3.upload_file(str(path), "teachers", f"hv/transformer/{path.name}")

        cache = tmp_path / "cache"
        cfg = dataclasses.replace(t2v_cfg(), teacher="s3://teachers/hv")
        loaded = build_backbone(cfg, cache_dir=cache)
        assert (cache / "s3" / "teachers" / "hv" / "transformer" / "config.json").is_file()
        x, s, cond = inputs()
        torch.testing.assert_close(loaded(x, s, cond), t2v(x, s, cond), rtol=0, atol=0)

        with pytest.raises(FileNotFoundError, match="s3://teachers/missing"):
            build_backbone(dataclasses.replace(cfg, teacher="s3://teachers/missing"), cache_dir=cache)
    finally:
        server.stop()
