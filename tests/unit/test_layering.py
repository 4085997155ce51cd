"""w2svd/ is a plain PyTorch library: importing it (all of it) pulls in no ray, deepspeed or mlflow."""

import pkgutil
import subprocess
import sys

import w2svd


def test_importing_every_w2svd_module_imports_no_cluster_framework():
    modules = [m.name for m in pkgutil.walk_packages(w2svd.__path__, "w2svd.")]
    assert "w2svd.roles" in modules and "w2svd.models.hunyuan" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"w2svd imported: {out.stdout.strip()}"
