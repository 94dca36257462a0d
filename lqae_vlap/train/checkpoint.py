"""Checkpoints with orbax: save every N steps, keep K, resume from the latest, save on preemption.

Only the trainable state is saved (params, optimizer state, step). Frozen weights come from their
own checkpoint folders and data order and rngs are functions of the step, so (state, step) is all
a restart needs to continue bit-for-bit.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from lqae_vlap.core import files


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for the trainer's state pytree."""

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = files.normalize(directory)  # gs://... kept as is (orbax reads it)
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers=ocp.StandardCheckpointHandler(),  # lets item_metadata read the tree
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=max(int(save_every), 1),
                max_to_keep=max(int(keep), 1),
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves when ``step`` is on the save interval (or ``force``); returns whether it saved."""
        if not force and not self._manager.should_save(step):
            return False
        if step in self._manager.all_steps():
            return False
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores ``step`` (latest by default) into the shapes and shardings of ``abstract_state``.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (from
            ``jax.eval_shape`` + the trainer's shardings).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match this config's model "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); use a fresh --workdir or "
                "the config the checkpoint was trained with") from e

    def restore_on_one_device(self, step: int | None = None) -> Any:
        """Restores a checkpoint onto this process's first device, whatever mesh or number of
        processes wrote it (to inspect or compare runs on a laptop)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            self._manager.item_metadata(step))
        return self.restore(abstract, step)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any process got a preemption notice (multi-host TPU)."""
        try:
            return bool(self._manager.reached_preemption(step))
        except Exception:  # needs jax.distributed; single process relies on SIGTERM below
            return False

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def find_checkpoint_dir(path: str) -> tuple[str, int | None]:
    """Resolves a user-given checkpoint path: a workdir, its checkpoints/ folder, or a step folder.

    Returns (manager directory, step or None for the latest). Raises CheckpointError naming the
    path when nothing usable is there.
    """
    path = files.normalize(path)
    if not files.exists(path):
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if files.isdir(files.join(path, "checkpoints")):
        path = files.join(path, "checkpoints")
    base = path.rstrip("/").rsplit("/", 1)[-1]
    if base.isdigit() and files.isdir(path):
        return path.rstrip("/")[: -len(base) - 1], int(base)
    steps = [d for d in files.listdir(path) if d.isdigit()] if files.isdir(path) else []
    if not steps:
        raise CheckpointError(
            f"no checkpoint steps found under {path}; point at a workdir, its checkpoints/ "
            "folder or one step folder inside it")
    return path, None


class PreemptionWatcher:
    """Turns SIGTERM (TPU/GCE preemption, SLURM, Kubernetes) into a flag the loop checks.

    The loop saves a checkpoint and exits cleanly at the next step boundary instead of dying
    mid-write. Restores the previous handlers on exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._event = threading.Event()
        self._signals = signals
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def process_allgather_flag(flag: bool) -> bool:
    """True on all processes if it is true on any (so every host stops at the same step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(jax.numpy.asarray(flag)).any())
