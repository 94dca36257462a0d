"""Checkpoints with orbax: save every N steps, keep K, resume from the latest, save on preemption.

Only the trainable state is saved (params, optimizer state, step). Frozen weights come from their
own checkpoint folders and data order and rngs are functions of the step, so (state, step) is all
a restart needs to continue bit-for-bit.
"""

from __future__ import annotations

import errno
import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lqae_vlap.core import files


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


# What orbax / tensorstore raise for a step folder that cannot be read: truncated or garbage
# files (ValueError: DATA_LOSS, OUT_OF_RANGE, NOT_FOUND; json's JSONDecodeError), a missing item
# folder (KeyError: 'Item "default" was not found'), files gone (FileNotFoundError). Anything
# else (a missing package, no permission, a bug) is not the checkpoint's fault and propagates.
_UNREADABLE = (ValueError, KeyError, TypeError, FileNotFoundError, NotADirectoryError)


def _unreadable(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it: tensorstore read errors reach us wrapped in a bare
    Exception) is one of the _UNREADABLE errors."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, _UNREADABLE):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _first_line(e: BaseException, limit: int = 200) -> str:
    if isinstance(e, json.JSONDecodeError):  # which file orbax was parsing, it does not say
        return f"one of its metadata files (default/_METADATA, ...) is not valid JSON: {e}"
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "os_error_code='28'" in text


def _path_names(tree: Any) -> dict[str, tuple[int, ...]]:
    """'params/encoder/kernel' -> shape for every leaf; dict keys, tuple indices and namedtuple
    fields all become plain names, so a checkpoint's metadata tree and the trainer's abstract
    state (optax namedtuples) name the same leaf the same way."""

    def name(k) -> str:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in leaves}


def tree_mismatch(saved: Any, wanted: Any) -> str | None:
    """The first difference between a checkpoint's metadata tree and the state a config builds
    (a parameter missing on either side, or two shapes), params first; None if they agree."""
    a, b = _path_names(saved), _path_names(wanted)
    order = sorted(set(a) | set(b), key=lambda k: (not k.startswith("params/"), k))
    differ = [k for k in order if a.get(k) != b.get(k)]
    if not differ:
        return None
    k = differ[0]
    more = f" (and {len(differ) - 1} more entries differ)" if len(differ) > 1 else ""
    if k not in a:
        return f"{k} {b[k]} is in this config's model but not in the checkpoint{more}"
    if k not in b:
        return f"{k} {a[k]} is in the checkpoint but not in this config's model{more}"
    return f"{k} has shape {a[k]} in the checkpoint and {b[k]} in this config{more}"


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """One device-side bool: every float in ``tree`` is finite (one fused reduction)."""
    flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(flags).all() if flags else jnp.array(True)


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for the trainer's state pytree.

    A context manager: leaving the ``with`` block (also on an error) waits for a pending save
    and closes orbax's manager, whose threads otherwise print "Event loop is closed" at exit.

    Args:
      writer: whether this process owns the folder (the run that holds the workdir's lock):
        only then are half-written saves of a killed run (``N.orbax-checkpoint-tmp``) cleaned
        up at start. A checkpoint read from elsewhere (``init_from``, ``mode=eval``) is never
        touched.
    """

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True,
                 writer: bool = False):
        self.directory = files.normalize(directory)  # gs://... kept as is (orbax reads it)
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers=ocp.StandardCheckpointHandler(),  # lets item_metadata read the tree
            options=ocp.CheckpointManagerOptions(
                # A reader's manager saves and prunes nothing (orbax warns if asked to).
                save_interval_steps=max(int(save_every), 1) if writer else 0,
                max_to_keep=max(int(keep), 1) if writer else None,
                enable_async_checkpointing=async_save,
                create=writer,
                read_only=not writer,
                cleanup_tmp_directories=writer,
            ),
        )

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: report that error, not a second one from the pending save
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _save_error(self, step: int, e: BaseException) -> CheckpointError:
        where = f"{self.directory}/{step}"
        if _disk_full(e):
            return CheckpointError(
                f"cannot save checkpoint {where}: no space left on the device; free space (or "
                "lower --config.train.keep_checkpoints) and run the same command again to resume "
                "from the last complete checkpoint")
        return CheckpointError(f"cannot save checkpoint {where}: {_first_line(e)}")

    def due(self, step: int) -> bool:
        """Whether ``maybe_save(step, ...)`` would save (the interval, or a preemption)."""
        return self._manager.should_save(step) and step not in self._manager.all_steps()

    def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves when ``step`` is on the save interval (or ``force``); returns whether it saved.

        Never saves a state with a NaN or infinity in it (raises NonFiniteStateError): the
        newest checkpoint on disk is always one a run can continue from.
        """
        if not force and not self._manager.should_save(step):
            return False
        if step in self._manager.all_steps():
            return False
        if not bool(all_finite(state)):
            raise NonFiniteStateError(step)
        try:
            return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
        except (ValueError, OSError) as e:  # tensorstore reports a full disk as a ValueError
            raise self._save_error(step, e) from e

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores ``step`` (latest by default) into the shapes and shardings of ``abstract_state``.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (from
            ``jax.eval_shape`` + the trainer's shardings).

        Raises CheckpointError in one line: which parameter differs from the config and both
        shapes, or which step folder cannot be read.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        problem = self._problem(abstract_state, step)
        if isinstance(problem, str):
            raise CheckpointError(problem)
        return problem[0]

    def _problem(self, abstract_state: Any, step: int) -> tuple[Any] | str:
        """(state,) if ``step`` restores; else why not, in one line. A checkpoint that does not
        fit the config raises CheckpointError at once (an older step will not fit either)."""
        where = f"{self.directory}/{step}"
        if not files.isdir(files.join(where, "default")):  # orbax would blame a "handler"
            return f"checkpoint {where} has no default/ folder (where its arrays are)"
        try:
            saved = self._manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001  (only _unreadable ones are the checkpoint's)
            if not _unreadable(e):
                raise
            return f"checkpoint {where} cannot be read ({_first_line(e)})"
        if saved is None:
            return f"checkpoint {where} has no readable metadata"
        mismatch = tree_mismatch(saved, abstract_state)
        if mismatch is not None:
            raise CheckpointError(
                f"checkpoint {where} does not match this config's model: {mismatch}; use a "
                "fresh --workdir or the config the checkpoint was trained with")
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # noqa: BLE001
            if not _unreadable(e):
                raise
            while not isinstance(e, _UNREADABLE):  # the tensorstore line, not orbax's wrapper
                e = e.__cause__ or e.__context__
            return f"checkpoint {where} cannot be read ({_first_line(e)})"
        if not bool(all_finite(state)):
            return f"checkpoint {where} holds NaN or infinite values"
        return (state,)

    def restore_newest_usable(self, abstract_state: Any, quarantine: str,
                              log: Callable[[str], None]) -> Any | None:
        """Restores the newest step that reads back whole and finite; None if there is no step.

        A step that cannot be restored (truncated, garbage or missing files, NaNs) is moved to
        ``quarantine``/STEP-TIME, outside this folder, so orbax no longer lists it, and the next
        older one is tried: nothing is deleted. Every process tries each step; a step counts as
        bad when it fails on any process, and only process 0 moves it.

        Raises CheckpointError when steps exist and none restores, or when they do not fit the
        config (then nothing is moved).
        """
        moved = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            problem = self._problem(abstract_state, step)
            bad = process_allgather_flag(isinstance(problem, str))
            if not bad:
                if moved:
                    self._manager.reload()  # forget the moved steps (else it would prune them)
                return problem[0]
            reason = problem if isinstance(problem, str) else f"checkpoint {self.directory}/" \
                f"{step} cannot be read on another process"
            target = files.join(quarantine, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
            if jax.process_index() == 0:
                files.move(f"{self.directory}/{step}", target)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"lqae_vlap moved step {step}")
            log(f"{reason}; moved it to {target} and trying the previous one")
            moved.append(step)
        self._manager.reload()
        if moved:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be restored (all moved to "
                f"{quarantine}); run the same command again to start from step 0, or move one "
                "back")
        return None

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
        try:
            self._manager.wait_until_finished()
        except (ValueError, OSError) as e:  # an async save that failed (e.g. a full disk)
            raise self._save_error(self._manager.latest_step() or 0, e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


class NonFiniteStateError(CheckpointError):
    """A save was asked for a state holding NaN or infinity (refused; the trainer says why)."""

    def __init__(self, step: int):
        super().__init__(f"the state at step {step} holds NaN or infinite values; not saved")
        self.step = step


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
    """Turns SIGTERM (TPU/GCE preemption, SLURM, Kubernetes) and SIGINT (Ctrl-C) into a flag
    the loop checks.

    The loop saves a checkpoint and exits cleanly at the next step boundary instead of dying
    mid-write. A second SIGINT is the usual "stop now": the default handler is back after the
    first, so it raises KeyboardInterrupt (main prints one line; the newest complete checkpoint
    stays). Restores the previous handlers on exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._event = threading.Event()
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self.signal_name = ""

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        self.signal_name = signal.Signals(signum).name
        self._event.set()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

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
