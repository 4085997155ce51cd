"""The KubeRay manifests in cluster/: valid against the operator's CRD schemas, and consistent
with the code they launch (entrypoints, config overrides, Ray pin, image, runtime env, secrets).

The CRD schemas live beside the repository (../shared/reference/kuberay-crds, see its README);
without them the schema tests skip and the consistency tests still run.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

from w2svd.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRD_DIR = REPO.parent / "shared" / "reference" / "kuberay-crds"
IMAGE_NAME = "ghcr.io/your-org/w2svd"
STAGES = ("preencode", "finetune", "distill", "generate")
EXPECTED_KIND = {"raycluster.yaml": "RayCluster", "rayservice.yaml": "RayService",
                 **{f"rayjob-{s}.yaml": "RayJob" for s in STAGES}}
# Env names whose value is a credential: they may only come from a Secret.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|(^|_)TOKEN($|_)|ACCESS_KEY|CREDENTIAL|API_KEY", re.I)
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(path: Path) -> dict:
    docs = [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one resource, found {len(docs)}"
    return docs[0]


MANIFESTS = {p.name: _load(p) for p in sorted(CLUSTER.glob("*.yaml"))}


def _cluster_spec(doc: dict) -> dict:
    if doc["kind"] == "RayService":
        return doc["spec"]["rayClusterConfig"]
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _groups(doc: dict) -> dict[str, dict]:
    """Head group (as "head") and worker groups by groupName."""
    spec = _cluster_spec(doc)
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}}


def _containers(doc: dict):
    for group_name, group in _groups(doc).items():
        for c in group["template"]["spec"]["containers"]:
            yield group_name, c
    submitter = doc["spec"].get("submitterPodTemplate") if doc["kind"] == "RayJob" else None
    for c in (submitter or {}).get("spec", {}).get("containers", []):
        yield "submitter", c


def _entrypoint(doc: dict) -> tuple[str, dict[str, str], list[str]]:
    """(stage, {--flag: value}, [overrides]) of `python -m pipelines.<stage> …`."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("pipelines."), argv[:3]
    stage, flags, overrides, rest = argv[2].split(".", 1)[1], {}, [], argv[3:]
    while rest:
        tok = rest.pop(0)
        if tok.startswith("--"):
            flags[tok] = rest.pop(0)
        else:
            overrides.append(tok)
    return stage, flags, overrides


def _quantity(q) -> float:
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, f"unparsed quantity {q!r}"
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


# ---------------------------------------------------------------- CRD schemas


def _k8s_to_jsonschema(node):
    """OpenAPI v3 as the API server applies it → plain JSON Schema.

    int-or-string → anyOf integer/string; nullable → also null; an object that lists its
    properties rejects unknown keys (what `kubectl apply`'s strict field validation does) unless
    it carries x-kubernetes-preserve-unknown-fields. CEL rules (x-kubernetes-validations) are
    not evaluated.
    """
    if isinstance(node, list):
        return [_k8s_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _k8s_to_jsonschema(v) if k not in ("properties",) else
           {pk: _k8s_to_jsonschema(pv) for pk, pv in v.items()} for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    for k in [k for k in out if k.startswith("x-kubernetes-")]:
        del out[k]
    return out


@functools.cache
def _validator(kind: str):
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (the shared reference folder is absent)")
    crd = yaml.load(path.read_text(), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _k8s_to_jsonschema(copy.deepcopy(v1["schema"]["openAPIV3Schema"]))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft4Validator)
    cls.check_schema(schema)
    return cls(schema)


def _errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}"
            for e in _validator(doc["kind"]).iter_errors(doc)]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_valid_against_crd_schema(name):
    assert _errors(MANIFESTS[name]) == [], name


def test_validator_rejects_broken_manifests():
    """The schema check is not vacuous: typical mistakes in strictly typed parts are caught."""
    cluster, job = MANIFESTS["raycluster.yaml"], MANIFESTS["rayjob-distill.yaml"]
    assert _errors(cluster) == [] and _errors(job) == []

    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any(e.startswith("spec.workerGroupSpecs.0.replicas") for e in _errors(bad)), _errors(bad)

    bad = copy.deepcopy(cluster)  # a misspelled key where unknown keys are not allowed
    bad["spec"]["workerGroupSpecs"][0]["minReplica"] = bad["spec"]["workerGroupSpecs"][0].pop("minReplicas")
    errs = _errors(bad)
    assert any("minReplica" in e for e in errs) and any("minReplicas" in e for e in errs), errs

    bad = copy.deepcopy(cluster)  # rayStartParams values are strings; an unquoted 0 is an int
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any(e.startswith("spec.headGroupSpec.rayStartParams.num-cpus") for e in _errors(bad)), _errors(bad)

    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in _errors(bad)), _errors(bad)

    bad = copy.deepcopy(job)  # deep inside the pod template: a resource quantity of the wrong form
    container = bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["memory"] = "800 GB"
    assert any("resources.limits.memory" in e for e in _errors(bad)), _errors(bad)


# ---------------------------------------------------------------- consistency with the repo


def test_expected_manifests_and_kinds():
    assert set(EXPECTED_KIND) <= set(MANIFESTS), f"missing: {set(EXPECTED_KIND) - set(MANIFESTS)}"
    for name, doc in MANIFESTS.items():
        assert doc["apiVersion"] == "ray.io/v1", name
        assert doc["kind"] == EXPECTED_KIND.get(name, doc["kind"]), name
        assert doc["kind"] in ("RayCluster", "RayJob", "RayService"), name
    groups = _groups(MANIFESTS["raycluster.yaml"])
    assert {"head", "gpu-workers", "cpu-workers"} <= set(groups)


def test_ray_version_matches_pyproject_pin():
    pin = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pin, "no ray[...]== pin in pyproject.toml"
    for name, doc in MANIFESTS.items():
        assert _cluster_spec(doc)["rayVersion"] == pin.group(1), name
    assert f"'{pin.group(1)}'" in (CLUSTER / "Dockerfile").read_text(), "Dockerfile's ray version check"


def test_one_pinned_image_everywhere():
    images = {c["image"] for doc in MANIFESTS.values() for _, c in _containers(doc)}
    assert len(images) == 1, images
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert name == IMAGE_NAME and tag and tag != "latest", image
    assert image in (CLUSTER / "README.md").read_text(), "README's build/push commands name another tag"


@pytest.mark.parametrize("stage", STAGES)
def test_job_entrypoint_runs_an_existing_stage_with_valid_arguments(stage):
    doc = MANIFESTS[f"rayjob-{stage}.yaml"]
    got_stage, flags, overrides = _entrypoint(doc)
    assert got_stage == stage
    module = REPO / "pipelines" / f"{stage}.py"
    assert module.is_file(), module
    source = module.read_text()
    if "pipelines.training" in source:  # the training programs share the driver's parser
        source += (REPO / "pipelines" / "training.py").read_text()
    known = set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', source))
    assert set(flags) <= known, f"unknown flags {set(flags) - known}; {module.name} has {sorted(known)}"
    assert flags.get("--config") == "hunyuan-t2v-13b"
    for flag in ("--input", "--output", "--data", "--run-dir"):
        if flag in flags:
            assert flags[flag].startswith("s3://"), (flag, flags[flag])
    # The overrides are valid config keys and values (the stage would refuse them at start-up).
    cfg = load_config(flags["--config"], overrides)
    for key in ("teacher", "vae", "text_encoder", "text_encoder_2"):
        if any(o.startswith(f"model.{key}=") for o in overrides):
            assert getattr(cfg.model, key).startswith("s3://"), key

    # What the stage asks Ray for fits into the job's own cluster.
    gpus = cpus = 0.0
    for group_name, group in _groups(doc).items():
        if group_name == "head":
            continue
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * _quantity(limits.get("nvidia.com/gpu", 0))
        cpus += group["replicas"] * _quantity(limits["cpu"])
    if stage == "preencode":
        d = cfg.data
        assert d.encoder_pool_size * d.encoder_num_gpus <= gpus
        assert d.encoder_pool_size * d.encoder_num_cpus + d.decode_num_cpus <= cpus
    elif stage == "generate":
        g = cfg.generate
        assert flags["--model"].startswith("models:/") and flags["--prompts"].startswith("s3://")
        assert 0 < g.actors * g.num_gpus <= gpus and g.actors * g.num_cpus <= cpus
    else:
        p = cfg.parallel
        assert p.use_gpu and p.num_workers <= gpus, (p.num_workers, gpus)
        assert p.num_workers * p.cpus_per_worker <= cpus


@pytest.mark.parametrize("stage", STAGES)
def test_job_lifecycle_and_runtime_env_match_ray_job_yaml(stage):
    spec = MANIFESTS[f"rayjob-{stage}.yaml"]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 0
    # One approach throughout: every job brings its own cluster.
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    reference = yaml.safe_load((REPO / "ray_job.yaml").read_text())
    assert runtime_env["env_vars"] == reference["env_vars"]
    # ray_job.yaml's `working_dir: .` means "upload my checkout"; the submitter pod has none.
    wd = runtime_env.get("working_dir")
    assert wd is None or "://" in wd, wd


@pytest.mark.parametrize("stage", STAGES)
def test_job_pod_templates_match_the_raycluster(stage):
    """The per-job clusters are copies of raycluster.yaml's groups: sizing edited in one place
    but not the others would silently differ between interactive and batch runs."""
    reference = _groups(MANIFESTS["raycluster.yaml"])
    for group_name, group in _groups(MANIFESTS[f"rayjob-{stage}.yaml"]).items():
        assert group_name in reference, group_name
        assert group["template"]["spec"] == reference[group_name]["template"]["spec"], group_name
        assert group["rayStartParams"] == reference[group_name]["rayStartParams"], group_name


def test_pods_have_environment_shm_and_resources():
    for name, doc in MANIFESTS.items():
        for group_name, group in _groups(doc).items():
            pod = group["template"]["spec"]
            for c in pod["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                where = f"{name}:{group_name}:{c['name']}"
                assert env["HF_HUB_OFFLINE"].get("value") == "1", where
                assert "configMapKeyRef" in env["MLFLOW_TRACKING_URI"]["valueFrom"], where
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert "secretKeyRef" in env[key]["valueFrom"], (where, key)
                if "AWS_ENDPOINT_URL" in env:
                    ref = env["AWS_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]
                    assert ref.get("optional") is True, where
                res = c["resources"]
                for kind in ("cpu", "memory"):
                    assert kind in res["requests"] and kind in res["limits"], (where, kind)
                gpus = _quantity(res["limits"].get("nvidia.com/gpu", 0))
                assert (gpus > 0) == (group_name == "gpu-workers"), where
                if group_name != "head":
                    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                    volumes = {v["name"]: v for v in pod.get("volumes", [])}
                    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
                    assert shm["medium"] == "Memory", where
                    # tmpfs pages count against the container's memory limit.
                    assert _quantity(shm["sizeLimit"]) < _quantity(res["limits"]["memory"]), where
                    start = group["rayStartParams"]
                    if "object-store-memory" in start:
                        assert int(start["object-store-memory"]) <= _quantity(shm["sizeLimit"]), where


def _inline_secrets(doc: dict) -> list[str]:
    found = []
    for group_name, c in _containers(doc):
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]) and "value" in e:
                found.append(f"{group_name}:{e['name']}")
    if doc["kind"] == "RayJob":
        env_vars = (yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "") or {}).get("env_vars", {})
        found += [f"runtimeEnvYAML:{k}" for k in env_vars if SECRET_NAME.search(k)]
    return found


def test_no_inline_secrets():
    # The detector itself works on a manifest with a pasted key.
    bad = copy.deepcopy(MANIFESTS["raycluster.yaml"])
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY_2", "value": "x"})
    assert _inline_secrets(bad)

    for name, doc in MANIFESTS.items():
        assert _inline_secrets(doc) == [], name
    for path in CLUSTER.iterdir():
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: AWS access key id"
        assert not re.search(r"^kind:\s*Secret\b", text, re.M), f"{path.name}: a Secret belongs outside the repo"


# ---------------------------------------------------------------- the RayService


def _serve_config() -> dict:
    return yaml.safe_load(MANIFESTS["rayservice.yaml"]["spec"]["serveConfigV2"])


def test_serve_config_is_valid_for_ray_serve_and_for_build_app():
    """serveConfigV2 passes Ray Serve's own schema; its application's import path and args are
    what pipelines.serve:build_app takes, with a config and overrides the config accepts."""
    import importlib
    import shlex

    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve import BUILD_ARGS

    schema = ServeDeploySchema.model_validate(_serve_config())
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert set(app.args) <= set(BUILD_ARGS) and app.args["model"].startswith("models:/")
    cfg = load_config(app.args["config"], shlex.split(app.args["overrides"]))
    s = cfg.serve
    assert schema.http_options.request_timeout_s > s.request_timeout_s
    assert s.results_uri.startswith("s3://") and s.alias_poll_s > 0
    # Every generator replica fits: max_replicas GPUs (and CPUs) within the GPU group at its largest.
    (group,) = _cluster_spec(MANIFESTS["rayservice.yaml"])["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert s.max_replicas * s.num_gpus <= group["maxReplicas"] * _quantity(limits["nvidia.com/gpu"])
    assert s.max_replicas * s.num_cpus + s.ingress_replicas <= group["maxReplicas"] * _quantity(limits["cpu"])
    # The runtime env sets nothing ray_job.yaml does not, and the same values.
    reference = yaml.safe_load((REPO / "ray_job.yaml").read_text())["env_vars"]
    assert app.runtime_env["env_vars"].items() <= reference.items()


def test_serve_token_comes_from_a_secret_on_every_pod():
    cfg = load_config("hunyuan-t2v-13b")
    for group_name, c in _containers(MANIFESTS["rayservice.yaml"]):
        env = {e["name"]: e for e in c.get("env", [])}
        ref = env[cfg.serve.auth_token_env]["valueFrom"]["secretKeyRef"]
        assert not ref.get("optional"), group_name  # a missing Secret must not open the API
