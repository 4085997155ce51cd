"""The config tree: named configs load, overrides apply, bad input names the key."""

import subprocess
import sys

import pytest

from w2svd.config import available_configs, flatten, load_config


def test_named_configs_load_and_differ_where_they_should():
    assert {"debug", "hunyuan-t2v-13b", "hunyuan-i2v-13b"} <= set(available_configs())
    debug, t2v, i2v = (load_config(n) for n in ("debug", "hunyuan-t2v-13b", "hunyuan-i2v-13b"))
    assert debug.model.arch.num_layers == 1 and not debug.parallel.use_gpu
    assert t2v.model.arch.num_layers == 20 and t2v.model.arch.num_single_layers == 40
    assert t2v.model.arch.guidance_embeds and t2v.method.guidance == "embedded"
    # i2v inherits the 13B sizes and changes conditioning
    assert i2v.model.arch.num_layers == 20 and i2v.model.arch.in_channels == 33
    assert not i2v.model.arch.guidance_embeds and i2v.method.guidance == "cfg"


def test_dotted_overrides_are_typed():
    cfg = load_config("debug", ["method.alpha_weak=0.5", "optim.steps=3", "method.generator=lora",
                                "model.teacher=s3://bucket/teacher", "data.buckets=[{name: a, frames: 5, height: 16, width: 32}]"])
    assert cfg.method.alpha_weak == 0.5 and cfg.optim.steps == 3 and cfg.method.generator == "lora"
    assert cfg.model.teacher == "s3://bucket/teacher"
    assert cfg.data.buckets[0].width == 32
    assert load_config("debug", ["optim.critic_lr=1e-3"]).optim.critic_lr == 1e-3
    assert flatten(cfg)["method.alpha_weak"] == 0.5


@pytest.mark.parametrize("override,message", [
    (["method.alpha_wek=0.5"], r"unknown key\(s\) \['alpha_wek'\] in method"),
    (["method.sampler=foo"], r"method.sampler = 'foo' is not allowed; choose one of \['renoise', 'euler'\]"),
    (["method.alpha_weak=1.5"], r"method.alpha_weak = 1.5 must lie in \[0, 1\]"),
    (["optim.steps=ten"], r"optim.steps must be an integer"),
    (["method.student_steps=3"], r"method.student_steps = 3; choose one of"),
    (["model.arch.rope_axes_dim=[2,2,2]"], r"rope_axes_dim .* must sum to attention_head_dim 8"),
    (["data.buckets=[{name: a, frames: 8, height: 16, width: 16}]"], r"frames = 8 must be 4k\+1"),
    (["method.name=dmd2", "method.generator=lora"], r"needs method.name = 'w2svd'"),
    (["model.family=hunyuan-i2v"], r"'embedded' is not available for model.family = 'hunyuan-i2v'"),
    (["nokey"], r"must look like section.key=value"),
    (["optim.finetune_betas=[0.9, 1.0]"], r"optim.finetune_betas must be two numbers in \[0, 1\)"),
    (["optim.finetune_sigma_density=beta"], r"optim.finetune_sigma_density = 'beta' is not allowed; choose one of \['logit_normal', 'uniform'\]"),
])
def test_bad_configs_fail_with_the_key_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("debug", override)


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown config 'nope'.*debug"):
        load_config("nope")


def test_config_command_prints_yaml_and_rejects_bad_keys():
    ok = subprocess.run([sys.executable, "-m", "pipelines.show_config", "debug", "method.alpha_weak=0.75"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "alpha_weak: 0.75" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "pipelines.show_config", "debug", "optim.stepz=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown key(s) ['stepz'] in optim" in bad.stderr


@pytest.mark.parametrize("overrides, fragment", [
    (["serve.max_ongoing_requests=2", "serve.max_batch_size=4"], "serve.max_ongoing_requests"),
    (["serve.min_replicas=3", "serve.max_replicas=2"], "serve.min_replicas"),
    (["serve.ingress_replicas=2"], "serve.results_uri"),
    (["generate.part_rows=0"], "generate.part_rows"),
    (["serve.codec=h265"], "serve.codec"),
])
def test_serving_settings_are_checked(overrides, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        load_config("debug", overrides)
    load_config("debug", ["serve.ingress_replicas=2", "serve.results_uri=s3://b/results"])
