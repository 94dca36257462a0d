"""The workdir a training run owns: checks before anything is written, and the one-writer lock.

Checks (``preflight``) read only, so bad input never creates or changes a workdir: the path is a
file, lies under a file or is read-only; the workdir already finished (or holds a checkpoint)
past the steps asked for; another run holds it.

The lock (``WorkdirLock``) is ``WORKDIR/lock.json``, created atomically, holding the host, pid
and start time of the run that writes there. A second run fails at once naming the holder. A
lock left by a run that was killed (same host, that pid no longer the process that took it) is
taken over with a line saying so; one from another host is only reported, with how to remove
it, since a live run there cannot be told from a dead one.

A multi-process run (a TPU pod) is one writer: process 0 checks and holds the lock for all of
them, and every process stops with it when process 0 cannot.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable

import jax

from lqae_vlap.core import files
from lqae_vlap.train.checkpoint import process_allgather_flag

LOCK_NAME = "lock.json"


class WorkdirError(RuntimeError):
    """A workdir that cannot be used as asked; the message names it and the fix."""


def _on_process_0(fn: Callable[[], str | None]) -> str | None:
    """Runs ``fn`` on process 0 only; its WorkdirError is raised on every process (elsewhere as
    a pointer to process 0's line), and its result (a notice or None) is known everywhere."""
    error, notice = None, None
    if jax.process_index() == 0:
        try:
            notice = fn()
        except WorkdirError as e:
            error = str(e)
    if process_allgather_flag(error is not None):
        raise WorkdirError(error or "process 0 cannot use the workdir (see its error line)")
    if process_allgather_flag(notice is not None):
        return notice or "process 0 found nothing to do (see its line)"
    return None


def finished_step(workdir: str) -> int | None:
    """The step ``done.json`` records (a run that completed), or None."""
    path = files.join(workdir, "done.json")
    if not files.exists(path):
        return None
    try:
        return int(json.loads(files.read_text(path))["step"])
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: the checkpoints still say how far the run got


def newest_checkpoint_step(workdir: str) -> int | None:
    """The newest finished step folder under WORKDIR/checkpoints (orbax's names: digits)."""
    folder = files.join(workdir, "checkpoints")
    if not files.isdir(folder):
        return None
    steps = [int(d) for d in files.listdir(folder) if d.isdigit()]
    return max(steps) if steps else None


def _check(workdir: str, steps: int | None, steps_flag: str) -> str | None:
    problem = files.why_not_writable_folder(workdir)
    if problem:
        raise WorkdirError(f"--workdir={workdir}: {problem}; pass a writable folder")
    if not files.isdir(workdir):
        return None
    holder = _live_holder(workdir)
    if holder is not None:
        raise WorkdirError(_in_use(workdir, holder))
    if steps is None:
        return None
    done = finished_step(workdir)
    newest = newest_checkpoint_step(workdir)
    if done is not None and done > steps:
        raise WorkdirError(
            f"{workdir} already finished at step {done} (> {steps_flag}={steps}); use a new "
            f"--workdir or raise {steps_flag}")
    if newest is not None and newest > steps:
        raise WorkdirError(
            f"{workdir} holds a checkpoint at step {newest} (> {steps_flag}={steps}); use a new "
            f"--workdir or raise {steps_flag}")
    if done is not None and done == steps:
        return (f"{workdir} already finished at step {done} ({steps_flag}={steps}); nothing to "
                f"do (raise {steps_flag} to train on, or use --config.mode=eval to evaluate)")
    return None


def preflight(workdir: str, steps: int | None,
              steps_flag: str = "--config.train.steps") -> str | None:
    """Checks, without writing anything, that a run of ``steps`` steps (None: an evaluation,
    which only writes) may use ``workdir``.

    Raises WorkdirError (one line) for a file, a path under a file, a read-only folder, a
    workdir held by a live run, or one past ``steps``. Returns a notice when the workdir already
    finished at exactly ``steps`` (nothing to do), else None.
    """
    return _on_process_0(lambda: _check(files.normalize(workdir), steps, steps_flag))


# --- the lock -------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or None where
    there is no /proc: tells a pid reused by a later process from the run that took the lock."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _read_holder(workdir: str) -> dict | None:
    path = files.join(workdir, LOCK_NAME)
    try:
        return json.loads(files.read_text(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}  # written by something else, or cut short: not ours to judge as stale


def _stale(holder: dict) -> bool:
    """True when the holder is surely gone: same host, and its pid is dead or is now another
    process (a start time other than the one it recorded: a pid reused after a restart, as
    in a container that starts its processes in the same order)."""
    if holder.get("host") != socket.gethostname() or "pid" not in holder:
        return False
    pid = int(holder["pid"])
    if not _alive(pid):
        return True
    start = holder.get("proc_start")
    return start is not None and _process_start(pid) not in (None, start)


def _live_holder(workdir: str) -> dict | None:
    holder = _read_holder(workdir)
    return None if holder is None or _stale(holder) else holder


def _in_use(workdir: str, holder: dict) -> str:
    lock = files.join(workdir, LOCK_NAME)
    if not holder:
        return (f"{workdir} is locked by {lock}, which cannot be read; if no run uses this "
                f"workdir, delete {lock}")
    where = f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
    fix = (f"wait for it to end or stop it (kill {holder.get('pid')})"
           if holder.get("host") == socket.gethostname() else
           f"if that run is gone (its host crashed), delete {lock}")
    return f"{workdir} is in use by {where}; {fix}, or use another --workdir"


class WorkdirLock:
    """``with WorkdirLock(workdir, log):`` makes the workdir (process 0) and holds its lock.

    Raises WorkdirError on every process when another live run holds it. Released (the file
    removed) on leaving the block, also on errors; a run killed with SIGKILL leaves it behind
    for the next run on the same host to take over.
    """

    def __init__(self, workdir: str, log: Callable[[str], None]):
        self.workdir = files.normalize(workdir)
        self.path = files.join(self.workdir, LOCK_NAME)
        self._log = log
        self._held = False

    def _take(self) -> None:
        files.makedirs(self.workdir)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "proc_start": _process_start(os.getpid())}
        text = json.dumps(me)
        if files.create_exclusive(self.path, text):
            self._held = True
            return
        holder = _read_holder(self.workdir)
        if holder is None:  # released between our try and our read: try once more
            if files.create_exclusive(self.path, text):
                self._held = True
                return
            holder = _read_holder(self.workdir) or {}
        if not _stale(holder):
            raise WorkdirError(_in_use(self.workdir, holder))
        files.remove(self.path)
        if not files.create_exclusive(self.path, text):  # another run took it over first
            raise WorkdirError(_in_use(self.workdir, _read_holder(self.workdir) or {}))
        self._held = True
        self._log(f"took over the lock of {self.workdir} from pid {holder.get('pid')} on "
                  f"{holder.get('host')} (since {holder.get('since')}), which is no longer "
                  "running")

    def __enter__(self) -> "WorkdirLock":
        def take():
            existed = files.isdir(self.workdir)
            try:
                self._take()
            except OSError as e:  # a full disk, a folder that vanished: one line, not a trace
                if not existed and not files.is_remote(self.workdir):
                    try:
                        os.rmdir(self.workdir)  # the empty folder this start made
                    except OSError:
                        pass
                raise WorkdirError(f"cannot create {self.path}: {e.strerror or e}; free space or "
                                   "use another --workdir") from e

        _on_process_0(take)
        return self

    def release(self) -> None:
        if self._held:
            self._held = False
            files.remove(self.path)

    def __exit__(self, *exc) -> None:
        self.release()
