"""A step with a NaN/inf loss, gradient or weight is not applied; the run stops naming the step
and the last good checkpoint; every checkpoint on disk is finite; resuming from it works."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.core import sharding
from lqae_vlap.train import checkpoint as ckpt_lib
from lqae_vlap.train import metrics as metrics_lib
from lqae_vlap.train import trainer
from tests.helpers import linear_config, linear_method, run_cli


def _one_device_step(config, build):
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    method = build(config, mesh)
    tx, schedule = trainer.make_optimizer(config.optim, config.train.steps, 8)
    init, _, state_sh = trainer.build_state(method, tx, mesh, config.seed)
    batch_sh = {"x": sharding.batch_sharding(mesh, 2)}
    step = trainer.make_train_step(method, tx, schedule, config.seed, state_sh, batch_sh, mesh)
    return init, step, mesh, method


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_step_with_a_non_finite_loss_leaves_the_state_as_it_was(bad):
    init, step, mesh, method = _one_device_step(linear_config(lr=0.1), linear_method)
    state = init()
    good = trainer._to_global({"x": np.ones((8, 1), np.float32)}, mesh)
    state, m = step(state, method.frozen, good)
    assert bool(m["finite"]) and int(state["step"]) == 1
    before = jax.device_get(state)
    poisoned = trainer._to_global({"x": np.full((8, 1), bad, np.float32)}, mesh)
    after, m = step(state, method.frozen, poisoned)
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after), before)  # incl. step


def test_a_state_with_nan_is_never_saved(tmp_path):
    state = {"params": {"w": jnp.array([1.0, jnp.nan])}, "step": jnp.array(3, jnp.int32)}
    with ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=2, async_save=False,
                               writer=True) as ckpt:
        with pytest.raises(ckpt_lib.NonFiniteStateError, match="step 3"):
            ckpt.maybe_save(3, state)
        assert ckpt.all_steps() == []


def _finite_checkpoints(workdir):
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1)
    for s in ckpt.all_steps():
        state = ckpt.restore_on_one_device(s)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state))), s
    return ckpt.all_steps()


def test_diverged_run_stops_before_saving_and_resumes_with_a_lower_lr(tmp_path):
    # lr 1e38: the weight is 1e38, 2e38, 3e38 after steps 1-3 and would overflow at step 4.
    with pytest.raises(trainer.TrainingDiverged) as e:
        trainer.train_and_evaluate(linear_config(steps=6, lr=1e38), str(tmp_path), linear_method)
    msg = str(e.value)
    assert "non-finite weights after the update" in msg and "at step 4" in msg, msg
    assert f"last good checkpoint is {tmp_path}/checkpoints/3" in msg, msg
    assert "--config.optim.lr (now 1e+38)" in msg and "\n" not in msg, msg
    assert _finite_checkpoints(tmp_path) == [1, 2, 3]
    assert not (tmp_path / "lock.json").exists() and not (tmp_path / "done.json").exists()

    state = trainer.train_and_evaluate(linear_config(steps=6, lr=1e-2), str(tmp_path),
                                       linear_method)
    assert int(state["step"]) == 6 and np.isfinite(np.asarray(state["params"]["w"])).all()
    assert _finite_checkpoints(tmp_path)[-1] == 6
    rows = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_cli_lr_1e6_on_lqae_tiny_ends_in_one_line_with_finite_checkpoints(tmp_path,
                                                                          tiny_mlm_dir):
    # The drill: checkpoints every 2 steps, loss logged every 10 only.
    proc = run_cli("--config=configs/lqae_tiny.py", f"--workdir={tmp_path}",
                   f"--config.model.lm_path={tiny_mlm_dir}", "--config.train.steps=12",
                   "--config.train.checkpoint_every=2", "--config.train.log_every=10",
                   "--config.optim.lr=1e6", "--config.eval.evals=()")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: non-finite"), proc.stderr
    steps = _finite_checkpoints(tmp_path)
    assert steps and f"{tmp_path}/checkpoints/{steps[-1]}" in lines[0], lines[0]
    assert f"at step {steps[-1] + 1} " in lines[0] or f"at step {steps[-1] + 2} " in lines[0]
