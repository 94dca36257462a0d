"""Workdir file access that works on local disks and on object stores (gs://, s3://, ...).

A TPU pod's workdir must be shared by every host, so it is a bucket (launch/tpu_pod.sh insists on
gs://). ``os`` and ``open`` would silently create a local folder called ``gs:`` instead, so every
workdir write goes through here: local paths use ``os`` (atomic rename for whole files), URLs go
through fsspec (``gcsfs`` for gs://, installed with ``pip install gcsfs``; orbax's epath uses the
same backend for the checkpoints).

Object stores cannot append, so ``AppendOnlyText`` (metrics.jsonl) keeps the lines in memory and
rewrites the object at most every ``flush_secs`` and on ``close``; a run that restarts reads the
existing object first, so lines are kept across restarts as they are on a local disk.
"""

from __future__ import annotations

import os
import posixpath
import time
from typing import Any


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as gs://bucket/dir (file:// and plain paths are local)."""
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


def _local(path: str | os.PathLike) -> str:
    s = os.fspath(path)
    return s[len("file://"):] if s.startswith("file://") else os.path.expanduser(s)


def _fs(path: str) -> tuple[Any, str]:
    try:
        import fsspec  # noqa: PLC0415  (only object-store workdirs need it)

        return fsspec.core.url_to_fs(path)
    except ImportError as e:  # fsspec itself, or the store's backend (gcsfs, s3fs)
        raise ImportError(f"{path} is an object-store path and its filesystem is not installed "
                          f"({e}); for gs:// run pip install gcsfs") from e


def normalize(path: str | os.PathLike) -> str:
    """An absolute local path, or the URL unchanged (``os.path.abspath`` would mangle it)."""
    return os.fspath(path) if is_remote(path) else os.path.abspath(_local(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    return (posixpath.join(os.fspath(base), *parts) if is_remote(base)
            else os.path.join(_local(base), *parts))


def makedirs(path: str | os.PathLike) -> None:
    if is_remote(path):
        fs, p = _fs(os.fspath(path))
        fs.makedirs(p, exist_ok=True)
    else:
        os.makedirs(_local(path), exist_ok=True)


def exists(path: str | os.PathLike) -> bool:
    if is_remote(path):
        fs, p = _fs(os.fspath(path))
        return fs.exists(p)
    return os.path.exists(_local(path))


def isdir(path: str | os.PathLike) -> bool:
    if is_remote(path):
        fs, p = _fs(os.fspath(path))
        return fs.isdir(p)
    return os.path.isdir(_local(path))


def listdir(path: str | os.PathLike) -> list[str]:
    """Entry names (not paths) in a folder."""
    if is_remote(path):
        fs, p = _fs(os.fspath(path))
        return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))
    return sorted(os.listdir(_local(path)))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes a whole file; readers never see a partial one (local: temp file + rename; object
    stores: an object appears only once its upload completes)."""
    if is_remote(path):
        fs, p = _fs(os.fspath(path))
        with fs.open(p, "wb") as f:
            f.write(data)
        return
    p = _local(path)
    tmp = f"{p}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Creates a file holding ``text`` only if nothing is at ``path``; returns whether it did.

    Local: one ``open(O_CREAT | O_EXCL)``, atomic even between hosts on one NFS export. Object
    stores: mode "xb" (gcsfs: a create-if-absent precondition) where the backend has it, else
    a check then a write, which two starts in the same second could both pass.
    """
    if is_remote(path):
        fs, p = _fs(os.fspath(path))
        try:
            with fs.open(p, "xb") as f:
                f.write(text.encode("utf-8"))
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError):  # a backend without exclusive creation
            if fs.exists(p):
                return False
            write_text(path, text)
            return True
    try:
        fd = os.open(_local(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except BaseException:  # e.g. a full disk: leave no empty file that looks held
        os.remove(_local(path))
        raise
    return True


def remove(path: str | os.PathLike) -> None:
    """Deletes one file; a file that is already gone is not an error."""
    try:
        if is_remote(path):
            fs, p = _fs(os.fspath(path))
            fs.rm_file(p)
        else:
            os.remove(_local(path))
    except FileNotFoundError:
        pass


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves a file or a folder (with everything in it) to ``dst``, making dst's parent."""
    if is_remote(src):
        fs, p = _fs(os.fspath(src))
        _, q = _fs(os.fspath(dst))
        fs.mv(p, q, recursive=True)
        return
    os.makedirs(os.path.dirname(_local(dst)), exist_ok=True)
    os.replace(_local(src), _local(dst))


def why_not_writable_folder(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be (created as) a folder this process writes in, or None if it can.

    Checks without creating anything: ``path`` is a file, lies under a file, or it (or the
    nearest folder above it that exists, where it would be created) is not writable (a
    read-only mount or permissions). Object stores are not checked (no cheap way to ask).
    """
    if is_remote(path):
        return None
    p = os.path.abspath(_local(path))
    if os.path.exists(p) and not os.path.isdir(p):
        return f"{p} is a file, not a folder"
    probe = p
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{p} would be created under {probe}, which is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "" if probe == p else f" (where {p} would be created)"
        return f"{probe}{what} is not writable (read-only or no permission)"
    return None


def read_bytes(path: str | os.PathLike) -> bytes:
    if is_remote(path):
        fs, p = _fs(os.fspath(path))
        with fs.open(p, "rb") as f:
            return f.read()
    with open(_local(path), "rb") as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


class AppendOnlyText:
    """A text file that grows by whole lines: ``write(line)``, ``flush()``, ``close()``.

    Local: an ordinary line-buffered append. Object store: lines are buffered and the object is
    rewritten with everything so far when ``flush_secs`` have passed since the last upload, on
    ``flush()`` and on ``close()``.
    """

    def __init__(self, path: str | os.PathLike, *, flush_secs: float = 30.0) -> None:
        self.path, self.flush_secs = os.fspath(path), float(flush_secs)
        self._remote = is_remote(path)
        if self._remote:
            self._text = read_text(path) if exists(path) else ""
            self._dirty, self._last = False, time.monotonic()
            self._file = None
        else:
            self._file = open(_local(path), "a", buffering=1, encoding="utf-8")

    def write(self, text: str) -> None:
        if not self._remote:
            self._file.write(text)
            return
        self._text += text
        self._dirty = True
        if time.monotonic() - self._last >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        if self._remote:
            if self._dirty:
                write_text(self.path, self._text)
                self._dirty, self._last = False, time.monotonic()
        elif self._file is not None:
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
