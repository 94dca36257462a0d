"""Trainer: sharded step equals one device, kill-and-resume equals an uninterrupted run."""

import dataclasses
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
from tests.helpers import (REPO, ConstantBatches, assert_sharded_step_matches_one_device,
                           linear_config, linear_method, regression_on_indexed_batches,
                           tiny_config)


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


def test_worker_processes_resume_exactly_and_match_threads(tmp_path, capsys):
    # One run on threads; one on 2 grain worker processes, stopped at step 3 and resumed to 6.
    # Batches are the same function of the step on both paths, so the parameters agree bit
    # for bit (the constant learning rate makes a 3-step and a 6-step schedule agree too).
    config = lambda steps: linear_config(steps=steps, lr=0.05)  # noqa: E731
    threads = trainer.train_and_evaluate(config(6), str(tmp_path / "threads"),
                                         regression_on_indexed_batches(0))
    trainer.train_and_evaluate(config(3), str(tmp_path / "processes"),
                               regression_on_indexed_batches(2))
    resumed = trainer.train_and_evaluate(config(6), str(tmp_path / "processes"),
                                         regression_on_indexed_batches(2))
    out = capsys.readouterr().out
    assert "resumed from" in out and "/3" in out and "threads in this process" not in out, out
    assert int(resumed["step"]) == 6
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 jax.device_get(threads["params"]), jax.device_get(resumed["params"]))


def test_lqae_training_batches_take_the_worker_processes_of_the_config(tiny_mlm_dir):
    config = tiny_config(tiny_mlm_dir, **{"data.worker_processes": 2})
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    batches = lqae.build(config, mesh).train_batches
    assert batches.worker_processes == 2
    assert batches._why_not_processes() is None  # the digits and the preprocess pickle


def test_weight_decay_mask_matrices_or_all():
    """'matrices' (the default) decays kernels only; 'all' every leaf (torch's AdamW on
    model.parameters()); anything else is refused by name."""
    import ml_collections
    import optax

    params = {"Dense_0": {"kernel": np.full((2, 2), 1.0, np.float32),
                          "bias": np.full((2,), 1.0, np.float32)}}
    zeros = jax.tree.map(np.zeros_like, params)
    base = dict(lr=0.5, b1=0.9, b2=0.999, weight_decay=0.1, warmup_steps=0)
    for which, bias_factor in ((None, 1.0), ("matrices", 1.0), ("all", 1 - 0.5 * 0.1)):
        optim = ml_collections.ConfigDict(base if which is None
                                          else {**base, "weight_decay_mask": which})
        tx, _ = trainer.make_optimizer(optim, total_steps=4, global_batch_size=1)
        new = optax.apply_updates(params, tx.update(zeros, tx.init(params), params)[0])
        np.testing.assert_allclose(new["Dense_0"]["kernel"], 1 - 0.5 * 0.1, rtol=1e-6)
        np.testing.assert_allclose(new["Dense_0"]["bias"], bias_factor, rtol=1e-6)
    with pytest.raises(ValueError, match="weight_decay_mask='biases' is not known"):
        trainer.make_optimizer(ml_collections.ConfigDict({**base, "weight_decay_mask": "biases"}),
                               total_steps=4, global_batch_size=1)


class _BatchesWithBadImages(ConstantBatches):
    """ConstantBatches whose source has replaced 5 unreadable images."""

    num_bad_images = 5


def test_logged_rows_carry_the_count_of_bad_images(tmp_path):
    def method(config, mesh):
        return dataclasses.replace(linear_method(config, mesh),
                                   train_batches=_BatchesWithBadImages())

    trainer.train_and_evaluate(linear_config(steps=3), str(tmp_path), method)
    rows = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [(r["step"], r["data/bad_images"]) for r in rows] == [(1, 5), (2, 5), (3, 5)]
    # A source without the counter logs no such column.
    trainer.train_and_evaluate(linear_config(steps=2), str(tmp_path / "plain"), linear_method)
    rows = metrics_lib.read_jsonl(os.path.join(tmp_path / "plain", "metrics.jsonl"))
    assert rows and all("data/bad_images" not in r for r in rows)
