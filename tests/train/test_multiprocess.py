"""Two processes (coordinator on 127.0.0.1, CPU devices) train like one process with 2 devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from lqae_vlap.train.checkpoint import Checkpointer

from lqae_vlap.train import metrics as metrics_lib
from tests.helpers import REPO

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, lm_path):
    return [sys.executable, "-m", "lqae_vlap.main", "--config=configs/lqae_tiny.py",
            f"--workdir={workdir}", f"--config.model.lm_path={lm_path}",
            f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=100"]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _params(workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1)
    assert ckpt.latest_step() == STEPS
    return ckpt.restore_on_one_device(STEPS)["params"]


def _losses(workdir):
    records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"]) if "loss" in r]


def test_two_processes_equal_one(tmp_path, tiny_mlm_dir):
    single = subprocess.run(_cmd(tmp_path / "single", tiny_mlm_dir), cwd=REPO, env=_env(2),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    assert "over 2 cpu device(s), 1 process(es)" in single.stdout, single.stdout

    port = _free_port()
    procs = [subprocess.Popen(_cmd(tmp_path / "multi", tiny_mlm_dir), cwd=REPO,
                              env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    # process 0 logs, process 1 stays quiet
    assert "over 2 cpu device(s), 2 process(es)" in outs[0], outs[0]
    assert "step 4/4" in outs[0] and "step 4/4" not in outs[1], outs

    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"),
                               rtol=0, atol=1e-6)
    assert len(_losses(tmp_path / "multi")) == STEPS  # one writer, one line per step
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 _params(tmp_path / "multi"), _params(tmp_path / "single"))
