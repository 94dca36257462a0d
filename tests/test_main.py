"""The command line: bad input ends with one clear line naming the key or path, no traceback."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_cli


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("flag,needles", [
    ("--config.train.stepz=3", ("--config.train.stepz", "stepz", "steps")),
    ("--config.model.encoder.widthx=3", ("--config.model.encoder.widthx",)),
    ("--config.train.steps=many", ("--config.train.steps", "many")),
    ("--config.loss.mlm=abc", ("--config.loss.mlm", "abc")),
])
def test_bad_config_keys_and_types(tmp_path, flag, needles):
    proc = run_cli("--config=configs/lqae_tiny.py", f"--workdir={tmp_path}", flag)
    assert_one_line_error(proc, *needles)


def test_overrides_may_come_before_the_config_file(tmp_path):
    """--config.KEY before --config=FILE is applied (the same one-line checks as after it)."""
    proc = run_cli("--config.train.steps=0", "--config=configs/lqae_tiny.py",
                   f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(proc, "--config.train.steps=0", ">= 1")
    proc = run_cli("--config.train.stepz=3", "--config", "configs/lqae_tiny.py",
                   f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(proc, "--config.train.stepz", "stepz")
    assert not (tmp_path / "w").exists()


def test_missing_config_file(tmp_path):
    proc = run_cli("--config=configs/does_not_exist.py", f"--workdir={tmp_path}")
    assert_one_line_error(proc, "configs/does_not_exist.py")


def test_missing_workdir_flag():
    proc = run_cli("--config=configs/lqae_tiny.py")
    assert_one_line_error(proc, "--workdir")


def test_missing_checkpoint_path(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = run_cli("--config=configs/lqae_tiny.py", f"--workdir={tmp_path / 'w'}",
                   f"--config.train.init_from={missing}")
    assert_one_line_error(proc, str(missing))
    assert not (tmp_path / "w").exists(), "a failed start must not create or touch the workdir"


def test_eval_without_checkpoint(tmp_path):
    proc = run_cli("--config=configs/lqae_tiny.py", f"--workdir={tmp_path / 'empty'}",
                   "--config.mode=eval")
    assert_one_line_error(proc, str(tmp_path / "empty"))


def test_missing_language_model_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    proc = run_cli("--config=configs/lqae_tiny.py", f"--workdir={tmp_path / 'w'}",
                   f"--config.model.lm_path={missing}")
    assert_one_line_error(proc, str(missing))
    assert not (tmp_path / "w").exists(), "a run that fails to build must not create the workdir"


# --- the workdir and the run (issue 17): refused before anything is written, one line each ----


def _tree(path):
    """Every path under ``path``, with each file's mtime (a folder's changes with the lock)."""
    return {p: None if os.path.isdir(p) else os.path.getmtime(p)
            for p in glob.glob(f"{path}/**", recursive=True)}


@pytest.mark.parametrize("value", ["-5", "0"])
def test_non_positive_steps(tmp_path, value):
    proc = run_cli("--config=configs/lqae_tiny.py", f"--workdir={tmp_path / 'w'}",
                   f"--config.train.steps={value}")
    assert_one_line_error(proc, f"--config.train.steps={value}", ">= 1")
    assert not (tmp_path / "w").exists()


def test_workdir_that_is_a_file_or_under_one(tmp_path):
    (tmp_path / "f").write_text("x")
    assert_one_line_error(run_cli("--config=configs/lqae_tiny.py", f"--workdir={tmp_path}/f"),
                          f"--workdir={tmp_path}/f", "is a file")
    assert_one_line_error(run_cli("--config=configs/lqae_tiny.py",
                                  f"--workdir={tmp_path}/f/run"), "which is a file")
    assert os.listdir(tmp_path) == ["f"]


def test_finished_workdir_with_fewer_steps_changes_nothing(tmp_path):
    (tmp_path / "done.json").write_text('{"step": 40}')
    (tmp_path / "config.json").write_text('{"the": "old config"}')
    before = _tree(tmp_path)
    proc = run_cli("--config=configs/lqae_tiny.py", f"--workdir={tmp_path}",
                   "--config.train.steps=10")
    assert_one_line_error(proc, f"{tmp_path} already finished at step 40 "
                          "(> --config.train.steps=10); use a new --workdir or raise")
    assert _tree(tmp_path) == before and (tmp_path / "config.json").read_text() == \
        '{"the": "old config"}'


def test_workdir_in_use(tmp_path):
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01 00:00:00 UTC",
          "proc_start": open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19]
          if os.path.exists("/proc/self/stat") else None}
    (tmp_path / "lock.json").write_text(json.dumps(me))
    proc = run_cli("--config=configs/lqae_tiny.py", f"--workdir={tmp_path}")
    assert_one_line_error(proc, f"{tmp_path} is in use by pid {os.getpid()} on host "
                          f"{socket.gethostname()} since 2026-01-01 00:00:00 UTC")
    assert sorted(os.listdir(tmp_path)) == ["lock.json"]


def test_ctrl_c_saves_then_a_changed_model_and_a_corrupt_checkpoint(tmp_path, tiny_mlm_dir):
    common = ["--config=configs/lqae_tiny.py", f"--workdir={tmp_path}",
              f"--config.model.lm_path={tiny_mlm_dir}", "--config.train.steps=30",
              "--config.eval.evals=()"]
    # Ctrl-C (SIGINT) saves at the next step boundary like SIGTERM and exits 130.
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "lqae_vlap.main", *common], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err
    saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert f"interrupted (SIGINT): saved step {max(saved)} to {tmp_path}/checkpoints" in out, out
    assert 3 <= max(saved) < 30 and not (tmp_path / "lock.json").exists()

    # Another architecture on that workdir: which weight and both shapes; nothing changed.
    before = _tree(tmp_path)
    proc = run_cli(*common, "--config.model.encoder.width=48")
    assert_one_line_error(proc, f"checkpoint {tmp_path}/checkpoints/{max(saved)} does not match",
                          "has shape", "(32,", "(48,")
    assert "Event loop is closed" not in proc.stdout + proc.stderr
    assert _tree(tmp_path) == before

    # Garbage in the newest checkpoint's arrays: moved aside, the previous one resumes.
    for f in glob.glob(f"{tmp_path}/checkpoints/{max(saved)}/default/**/d/*", recursive=True):
        with open(f, "r+b") as fh:
            fh.write(os.urandom(os.path.getsize(f)))
    proc = run_cli(*common)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"checkpoint {tmp_path}/checkpoints/{max(saved)} cannot be read" in proc.stdout
    assert f"moved it to {tmp_path}/checkpoints_bad/{max(saved)}-" in proc.stdout
    assert "resumed from" in proc.stdout and (tmp_path / "done.json").exists()
