"""No warning at start-up that does not concern the run.

transformers warns at import when PyTorch is missing, as it is on the core install (torch is only
in the test extra): lqae_vlap/__init__.py turns that advisory off. The check hides torch from a
fresh interpreter (find_spec says no, import fails), as on a machine without it.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HIDE_TORCH = '''
import importlib.abc, importlib.util, sys
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    return None if name.split(".")[0] == "torch" else _find_spec(name, package)
importlib.util.find_spec = find_spec
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
'''


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", HIDE_TORCH + code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_hidden_torch_really_makes_transformers_warn():
    # The control: without lqae_vlap, transformers prints the warning, so the check below can fail.
    proc = run_without_torch("import transformers; transformers.AutoConfig")
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch was not found" in proc.stderr


def test_no_pytorch_warning_when_lqae_vlap_loads_transformers():
    proc = run_without_torch(
        "from lqae_vlap.models import hf_weights\n"
        "import transformers; transformers.AutoConfig; transformers.AutoTokenizer\n"
        "print('ok')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert "PyTorch was not found" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # nothing else either
