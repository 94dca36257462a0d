"""Trainer: sharded step equals one device, kill-and-resume equals an uninterrupted run."""

import importlib.util
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from lqae_vlap.core import sharding
from lqae_vlap.methods import lqae
from lqae_vlap.train import metrics as metrics_lib
from lqae_vlap.train import trainer
from lqae_vlap.train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name, **overrides):
    """configs/NAME.py's get_config(), with dotted-key overrides ("model.lm_path"=...)."""
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, f"configs/{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def tiny_config(lm_path, **overrides):
    return load_config("lqae_tiny", **{"model.lm_path": lm_path, **overrides})


def run_steps(config, mesh, num_steps, build=lqae.build):
    method = build(config, mesh)
    tx, schedule = trainer.make_optimizer(config.optim, config.train.steps, config.data.batch_size)
    init, _, state_sh = trainer.build_state(method, tx, mesh, config.seed)
    state = init()
    batch0 = method.train_batches.batch_at(0)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch0.items()}
    step = trainer.make_train_step(method, tx, schedule, config.seed, state_sh, batch_sh, mesh)
    losses = []
    for s in range(num_steps):
        batch = trainer._to_global(method.train_batches.batch_at(s), mesh)
        state, m = step(state, method.frozen, batch)
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state["params"]), state


def assert_sharded_step_matches_one_device(config, build=lqae.build, steps=3):
    """data=2 x fsdp=4 on 8 fake devices vs one device: same losses and params within 1e-5."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    one = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    eight = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    losses_1, params_1, _ = run_steps(config, one, steps, build)
    losses_8, params_8, state_8 = run_steps(config, eight, steps, build)
    np.testing.assert_allclose(losses_8, losses_1, rtol=0, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=0, atol=1e-5),
                 params_1, params_8)
    # fsdp really shards: some trainable weight is split over the fsdp axis.
    specs = [x.sharding.spec for x in jax.tree.leaves(state_8["params"])]
    assert any("fsdp" in str(s) for s in specs), specs
    assert losses_1[-1] < losses_1[0]


def test_mesh_shape_resolution():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.mesh_shape({"dp": 8}, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_sharded_step_matches_one_device(tiny_mlm_dir):
    assert_sharded_step_matches_one_device(tiny_config(tiny_mlm_dir))


def test_frozen_weights_outside_optimizer(tiny_mlm_dir):
    config = tiny_config(tiny_mlm_dir)
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    method = lqae.build(config, mesh)
    tx, _ = trainer.make_optimizer(config.optim, 4, 16)
    _, abstract, _ = trainer.build_state(method, tx, mesh, 0)
    frozen_count = sum(x.size for x in jax.tree.leaves(method.frozen))
    param_count = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract["params"]))
    opt_count = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract["opt_state"]))
    # AdamW keeps two moments per trainable weight (+ counters), nothing for the frozen LM.
    assert 2 * param_count <= opt_count < 2 * param_count + 16
    assert frozen_count > param_count  # the 30,522-word codebook alone is bigger


def _train_cli(workdir, lm_path, steps):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "lqae_vlap.main", "--config=configs/lqae_tiny.py",
         f"--workdir={workdir}", f"--config.model.lm_path={lm_path}",
         f"--config.train.steps={steps}", "--config.train.checkpoint_every=100"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_params(workdir, step):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1)
    assert ckpt.latest_step() == step
    return ckpt.restore_on_one_device(step)["params"]


def test_sigterm_then_resume_equals_uninterrupted(tmp_path, tiny_mlm_dir):
    steps = 30  # long enough that the signal lands mid-run (a step takes milliseconds)
    straight = _train_cli(tmp_path / "straight", tiny_mlm_dir, steps)
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out

    # Preempt after step 2 is logged: SIGTERM must save at the next step boundary and exit 0.
    proc = _train_cli(tmp_path / "killed", tiny_mlm_dir, steps)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    log = "".join(seen) + rest
    assert proc.returncode == 0, log
    assert "preempted: saved step" in log, log
    saved = Checkpointer(os.path.join(tmp_path / "killed", "checkpoints"), save_every=1,
                         keep=1).latest_step()
    assert 2 <= saved < steps, log
    assert not (tmp_path / "killed" / "done.json").exists()

    resumed = _train_cli(tmp_path / "killed", tiny_mlm_dir, steps)
    out2, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out2
    assert "resumed from" in out2 and f"/{saved}" in out2, out2

    a = _final_params(tmp_path / "straight", steps)
    b = _final_params(tmp_path / "killed", steps)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)

    # Metrics went to JSONL (and TensorBoard); the resumed run logged the remaining steps.
    records = metrics_lib.read_jsonl(os.path.join(tmp_path / "killed", "metrics.jsonl"))
    logged = sorted({r["step"] for r in records if "loss" in r})
    assert logged[-1] == steps and set(range(1, steps + 1)) <= set(logged)
    assert os.listdir(tmp_path / "killed" / "tensorboard")
