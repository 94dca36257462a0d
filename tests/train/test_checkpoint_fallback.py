"""A newest checkpoint that cannot be restored is reported, moved aside (not deleted) and the
previous one used; a checkpoint that does not fit the config names the parameter and shapes."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lqae_vlap.train import checkpoint as ckpt_lib
from lqae_vlap.train import trainer
from tests.helpers import linear_config, regression_method


def _train(workdir, steps, **overrides):
    config = linear_config(steps=steps, lr=0.05)
    config.update(overrides)
    return jax.device_get(trainer.train_and_evaluate(config, str(workdir), regression_method))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A workdir stopped at step 3 (checkpoints 1-3) and the state of a straight 5-step run."""
    root = tmp_path_factory.mktemp("fallback")
    _train(root / "three", 3)
    os.remove(root / "three" / "done.json")
    return root / "three", _train(root / "five", 5)


def _data_files(step_dir):
    # The arrays' bytes: default/d/* and default/ocdbt.process_N/d/* (orbax 0.12's OCDBT).
    return sorted(glob.glob(f"{step_dir}/default/**/d/*", recursive=True))


def _truncate(step_dir):
    for f in _data_files(step_dir):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 3)


def _garbage(step_dir):
    rng = np.random.RandomState(0)
    for f in _data_files(step_dir):
        with open(f, "wb") as fh:
            fh.write(rng.bytes(os.path.getsize(f)))


def _garbage_metadata(step_dir):
    with open(f"{step_dir}/default/_METADATA", "w") as fh:
        fh.write("{not json")


def _no_default(step_dir):
    shutil.rmtree(f"{step_dir}/default")


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


def _nan(step_dir):
    # A NaN checkpoint as the old trainer could write one: the same tree, w poisoned.
    directory, step = os.path.dirname(step_dir), int(os.path.basename(step_dir))
    reader = ckpt_lib.Checkpointer(directory, save_every=1, keep=5)
    state = jax.tree.map(np.array, jax.device_get(reader.restore_on_one_device(step)))
    reader.close()
    state["params"]["w"][0, 0] = np.nan
    shutil.rmtree(step_dir)
    with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as m:
        m.save(step, args=ocp.args.StandardSave(state))


@pytest.mark.parametrize("corrupt", [_truncate, _garbage, _garbage_metadata, _no_default, _empty,
                                     _nan], ids=lambda f: f.__name__.strip("_"))
def test_unrestorable_newest_checkpoint_falls_back_to_the_previous_one(
        corrupt, runs, tmp_path, capsys):
    three, straight = runs
    workdir = tmp_path / "w"
    shutil.copytree(three, workdir)
    corrupt(str(workdir / "checkpoints" / "3"))
    capsys.readouterr()
    state = _train(workdir, 5)
    out = capsys.readouterr().out
    line = next((line for line in out.splitlines() if "moved it to" in line), out)  # or all
    assert line.startswith(f"checkpoint {workdir}/checkpoints/3 "), line
    moved = os.listdir(workdir / "checkpoints_bad")
    assert len(moved) == 1 and moved[0].startswith("3-") and moved[0] in line, (moved, line)
    assert f"resumed from {workdir}/checkpoints/2" in out, out
    # Resuming from step 2 redoes step 3 exactly: the same state as the run never corrupted.
    jax.tree.map(np.testing.assert_array_equal, state, straight)


def test_every_checkpoint_unrestorable_is_one_error_and_nothing_deleted(runs, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(runs[0], workdir)
    for step in (1, 2, 3):
        _empty(str(workdir / "checkpoints" / str(step)))
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint in .* could be restored"):
        _train(workdir, 5)
    assert len(os.listdir(workdir / "checkpoints_bad")) == 3
    assert not (workdir / "lock.json").exists()


def test_checkpoint_of_another_shape_names_the_parameter_and_both_shapes(runs, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(runs[0], workdir)
    config_before = (workdir / "config.json").read_text()
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        _train(workdir, 5, width=3)
    msg = str(e.value)
    assert "checkpoints/3 does not match this config's model" in msg, msg
    assert "params/b has shape (2,) in the checkpoint and (3,) in this config" in msg, msg
    assert "more entries differ" in msg and "\n" not in msg, msg
    # Nothing moved, nothing rewritten, the lock released.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]
    assert not (workdir / "checkpoints_bad").exists() and not (workdir / "lock.json").exists()
    assert (workdir / "config.json").read_text() == config_before
    assert json.loads(config_before)["train"]["steps"] == 3


def test_tree_mismatch_reports_missing_and_extra_parameters():
    shape = jax.ShapeDtypeStruct
    saved = {"params": {"w": shape((4, 2), np.float32)}, "step": shape((), np.int32)}
    wanted = {"params": {"w": shape((4, 2), np.float32), "v": shape((3,), np.float32)},
              "step": shape((), np.int32)}
    assert ckpt_lib.tree_mismatch(saved, saved) is None
    assert ckpt_lib.tree_mismatch(saved, wanted) == (
        "params/v (3,) is in this config's model but not in the checkpoint")
    assert ckpt_lib.tree_mismatch(wanted, saved) == (
        "params/v (3,) is in the checkpoint but not in this config's model")
