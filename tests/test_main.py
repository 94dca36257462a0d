"""The command line: bad input ends with one clear line naming the key or path, no traceback."""

import subprocess

import pytest

from tests.helpers import run_cli


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
