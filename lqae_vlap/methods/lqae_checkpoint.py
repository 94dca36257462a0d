"""Reads a trained LQAE out of its workdir, for use as a frozen model elsewhere (VLAP's 'lqae'
vision tower): the run's ``config.json`` and the trainable params of one orbax step.

The trainer (train/checkpoint.py) saves {'params', 'opt_state', 'step'} under
``WORKDIR/checkpoints/STEP/default``; methods may not import train, so this reads the same layout
with orbax directly, restoring the 'params' subtree only (the optimizer's moments, twice the
params' size, stay on disk).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from lqae_vlap.core import files


def checkpoint_steps(workdir: str) -> list[int]:
    """The complete steps under ``workdir/checkpoints`` (folders named by a number that hold
    their arrays, ``default/``), ascending; [] when there are none."""
    where = files.join(files.normalize(workdir), "checkpoints")
    if not files.isdir(where):
        return []
    return sorted(int(d) for d in files.listdir(where)
                  if d.isdigit() and files.isdir(files.join(where, d, "default")))


def read_lqae(workdir: str, step: int = -1, key: str = "config.model.vision.workdir"
              ) -> tuple[ml_collections.ConfigDict, Any, int]:
    """(the run's config, its trainable params on this process's first device, the step read).

    step: -1 = the newest. ``key`` names the config entry that pointed here, for the one-line
    ValueError when the workdir holds no such run or step.
    """
    workdir = files.normalize(workdir)
    config_path = files.join(workdir, "config.json")
    steps = checkpoint_steps(workdir)
    if not files.exists(config_path) or not steps:
        raise ValueError(f"{key}={workdir} holds no LQAE checkpoint (no config.json and "
                         "checkpoints/STEP/ there); train one first: python -m lqae_vlap.main "
                         f"--config=configs/lqae_scenes.py --workdir={workdir}")
    config = ml_collections.ConfigDict(json.loads(files.read_text(config_path)))
    if config.get("method") != "lqae":
        raise ValueError(f"{key}={workdir} is a {config.get('method')!r} run, not an LQAE one")
    step = steps[-1] if int(step) < 0 else int(step)
    if step not in steps:
        raise ValueError(f"{key}={workdir} has no checkpoint at step {step}; it has {steps}")
    path = files.join(workdir, "checkpoints", str(step), "default")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {"params": jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree["params"])}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
    return config, restored["params"], step
