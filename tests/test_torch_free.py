"""The VLAP demo runs on the README's install, which has no torch (torch is in the test extra
only): the CLI in a subprocess where torch cannot be found, as if it were not installed."""

import os
import subprocess
import sys

from tests.helpers import REPO

# Every finder on sys.meta_path is wrapped so that torch is neither importable nor listed as an
# installed distribution (what transformers' is_torch_available looks at); at exit the process
# reports whether anything got torch in anyway.
HIDE_TORCH = r"""
import atexit, runpy, sys

def _torch(name):
    return (name or "").split(".")[0] == "torch"

class Hide:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        find = getattr(self.inner, "find_spec", None)
        return None if _torch(name) or find is None else find(name, path, target)
    def find_distributions(self, context=None):
        find = getattr(self.inner, "find_distributions", None)
        return iter(()) if find is None else (
            d for d in find(context) if not _torch(d.metadata["Name"]))
    def invalidate_caches(self):
        getattr(self.inner, "invalidate_caches", lambda: None)()

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
atexit.register(lambda: print("torch imported: " + str("torch" in sys.modules), file=sys.stderr))
sys.argv = ["lqae_vlap.main"] + sys.argv[1:]
runpy.run_module("lqae_vlap.main", run_name="__main__", alter_sys=True)
"""


def test_vlap_demo_trains_and_evaluates_without_torch(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    workdir = tmp_path / "w"
    proc = subprocess.run(
        [sys.executable, "-c", HIDE_TORCH, "--config=configs/vlap_demo.py:1",
         f"--workdir={workdir}", "--config.data.batch_size=8", "--config.model.vision.width=24",
         "--config.eval.evals=('loss', 'vqa')", "--config.eval.batch_size=8",
         "--config.eval.num_batches=1", "--config.eval.vqa.max_questions=4",
         "--config.eval.vqa.max_new_tokens=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "torch imported: False" in proc.stderr, out
    assert "Traceback" not in out and "PyTorch was not found" not in out, out
    assert "step 1/1" in proc.stdout and "accuracy on 4 questions" in proc.stdout, out
    assert (workdir / "done.json").exists()
