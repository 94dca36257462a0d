"""SIGKILL at random moments (start-up, a step, a save), resume, repeat: the run ends with the
same state, bit for bit, as one that was never killed, and one metrics row per step."""

import os
import random
import time

import jax
import numpy as np

from lqae_vlap.train import metrics as metrics_lib
from lqae_vlap.train.checkpoint import Checkpointer
from tests.helpers import train_subprocess

STEPS = 40


def _final_state(workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1)
    assert ckpt.latest_step() == STEPS
    return jax.device_get(ckpt.restore_on_one_device(STEPS))


def _loss_rows(workdir):
    rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _kill_after_step(proc, step: int, delay: float) -> None:
    """SIGKILL ``delay`` seconds after the run logs ``step`` (mid-step, mid-save, or between)."""
    for line in proc.stdout:
        if line.startswith(f"step {step}/"):
            time.sleep(delay)
            break
    proc.kill()
    proc.communicate(timeout=120)


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    straight = train_subprocess(tmp_path / "straight", STEPS)  # alongside the killed runs
    killed = tmp_path / "killed"
    rng = random.Random(17)

    proc = train_subprocess(killed, STEPS)  # killed while it starts (or compiles)
    time.sleep(rng.uniform(0.5, 3.0))
    proc.kill()
    proc.communicate(timeout=120)
    for low, high in ((2, 12), (15, 30)):  # then twice while it trains and saves
        proc = train_subprocess(killed, STEPS)
        _kill_after_step(proc, rng.randint(low, high), rng.uniform(0.0, 0.05))
    done = sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
    assert 15 <= done[-1] < STEPS, done

    last = train_subprocess(killed, STEPS)
    out, _ = last.communicate(timeout=300)
    assert last.returncode == 0, out
    assert "took over the lock" in out and "resumed from" in out, out
    out_straight, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out_straight

    a, b = _final_state(tmp_path / "straight"), _final_state(killed)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # params, AdamW moments and step
    assert int(b["step"]) == STEPS
    # Steps redone after a kill replaced their rows: one row per step, the same losses.
    assert _loss_rows(killed) == _loss_rows(tmp_path / "straight")
    assert [s for s, _ in _loss_rows(killed)] == list(range(1, STEPS + 1))
    assert not (killed / "lock.json").exists()
    assert not [d for d in os.listdir(killed / "checkpoints") if "tmp" in d]
