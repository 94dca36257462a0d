"""Metrics: TensorBoard event files + one JSON line per record in the workdir, and a progress line.

Only process 0 writes (``active=False`` elsewhere) so a pod does not write the same file 64 times.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from lqae_vlap.core import files


def _scalar(v: Any) -> float | None:
    a = np.asarray(v)
    if a.size != 1 or not np.issubdtype(a.dtype, np.number):
        return None
    return float(a.reshape(()))


class MetricWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard files in ``workdir/tensorboard``.

    The workdir may be a bucket (gs://...): see core/files.py (tensorboardX writes gs:// itself).
    """

    def __init__(self, workdir: str, *, active: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        """resume_step: a training run restarting from this step (0: from scratch) drops the
        records of later steps, which it is about to redo, so each step has one row (and
        TensorBoard purges them likewise). None (evaluation) keeps every record."""
        self.active = active
        self._tb = None
        self._jsonl = None
        if not active:
            return
        files.makedirs(workdir)
        path = files.join(workdir, "metrics.jsonl")
        if resume_step is not None and files.exists(path):
            _drop_records_after(path, resume_step)
        self._jsonl = files.AppendOnlyText(path)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: JSONL alone is still complete
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = {} if resume_step is None else {"purge_step": int(resume_step) + 1}
                self._tb = SummaryWriter(files.join(workdir, "tensorboard"), flush_secs=10,
                                         **purge)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        scalars = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
        if self.active:
            self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
            if self._tb is not None:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, int(step))
        return scalars

    def close(self) -> None:
        """Flushes and closes both files; a failure (a full disk) is raised after both tried."""
        error = None
        if self._jsonl is not None:
            try:
                self._jsonl.close()
            except OSError as e:
                error = e
            self._jsonl = None
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except OSError as e:
                # tensorboardX retries close() at exit and prints a traceback: mark it closed.
                tb.event_writer._closed = True
                error = error or e
        if error is not None:
            raise error


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites ``path`` (atomically) without the records of steps after ``step``."""
    lines = files.read_text(path).splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            record_step = record.get("step", 0) if isinstance(record, dict) else 0
        except ValueError:  # a line cut short by a kill: it is redone with its step
            continue
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        files.write_text(path, "".join(kept))


def read_jsonl(path: str) -> list[dict[str, float]]:
    return [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Steps/s and ETA over the steps since the last report (compilation excluded after the first)."""

    def __init__(self, total_steps: int, start_step: int):
        self.total = total_steps
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def line(self, step: int, scalars: Mapping[str, float]) -> str:
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if not k.startswith("_"))
        return (f"step {step}/{self.total} {shown} | {rate:.2f} steps/s | "
                f"ETA {_fmt_duration(eta)}")
