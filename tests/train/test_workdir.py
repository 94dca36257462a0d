"""One workdir, one writer (the lock), and bad workdirs or step counts refused before anything
is written; a full disk is one line."""

import errno
import json
import os
import socket
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from lqae_vlap.core import files
from lqae_vlap.train import checkpoint as ckpt_lib
from lqae_vlap.train import trainer
from lqae_vlap.train import workdir as workdir_lib
from tests.helpers import linear_config, linear_method


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir, **holder):
    os.makedirs(workdir, exist_ok=True)
    (workdir / "lock.json").write_text(json.dumps(holder))


def test_a_second_lock_fails_at_once_naming_the_holder(tmp_path):
    logs = []
    with workdir_lib.WorkdirLock(str(tmp_path), logs.append):
        holder = json.loads((tmp_path / "lock.json").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(workdir_lib.WorkdirError) as e:
            workdir_lib.preflight(str(tmp_path), 5)
        assert f"{tmp_path} is in use by pid {os.getpid()} on host {socket.gethostname()} " \
            f"since {holder['since']}" in str(e.value)
    assert not (tmp_path / "lock.json").exists() and logs == []
    with pytest.raises(RuntimeError, match="boom"):  # released on errors too
        with workdir_lib.WorkdirLock(str(tmp_path), logs.append):
            raise RuntimeError("boom")
    assert not (tmp_path / "lock.json").exists()


def test_a_live_holder_on_this_host_is_not_taken_over(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, host=socket.gethostname(), pid=sleeper.pid, since="then",
                    proc_start=workdir_lib._process_start(sleeper.pid))
        with pytest.raises(workdir_lib.WorkdirError, match=f"in use by pid {sleeper.pid} .*"
                           f"kill {sleeper.pid}"):
            with workdir_lib.WorkdirLock(str(tmp_path), print):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("why", ["dead pid", "pid reused"])
def test_a_stale_lock_on_this_host_is_taken_over_with_a_line(tmp_path, why):
    if why == "dead pid":
        pid, start = _dead_pid(), None
    else:  # our parent is alive but started at another time than the holder recorded
        pid, start = os.getppid(), "1"
    _write_lock(tmp_path, host=socket.gethostname(), pid=pid, since="yesterday", proc_start=start)
    assert workdir_lib.preflight(str(tmp_path), 5) is None  # stale: not "in use"
    logs = []
    with workdir_lib.WorkdirLock(str(tmp_path), logs.append):
        assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
    assert len(logs) == 1 and f"took over the lock of {tmp_path} from pid {pid}" in logs[0]


def test_a_lock_from_another_host_is_reported_with_how_to_clear_it(tmp_path):
    _write_lock(tmp_path, host="elsewhere", pid=1, since="yesterday")
    with pytest.raises(workdir_lib.WorkdirError) as e:
        with workdir_lib.WorkdirLock(str(tmp_path), print):
            pass
    assert "in use by pid 1 on host elsewhere" in str(e.value)
    assert f"delete {tmp_path}/lock.json" in str(e.value)


def test_unusable_workdir_paths_are_refused_without_creating_anything(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(workdir_lib.WorkdirError, match="is a file, not a folder"):
        workdir_lib.preflight(str(a_file), 5)
    with pytest.raises(workdir_lib.WorkdirError, match="under .*file, which is a file"):
        workdir_lib.preflight(str(a_file / "run"), 5)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path)
                        else real_access(p, m))  # root ignores chmod; a read-only mount
    with pytest.raises(workdir_lib.WorkdirError, match=f"{tmp_path} .*is not writable"):
        workdir_lib.preflight(str(tmp_path / "new"), 5)
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("key", ["steps", "checkpoint_every", "keep_checkpoints", "log_every"])
@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_counts_are_refused_before_anything_is_built(tmp_path, key, value):
    config = linear_config()
    config.train[key] = value
    with pytest.raises(ValueError, match=f"--config.train.{key}={value}: must be a whole number"):
        trainer.train_and_evaluate(config, str(tmp_path / "w"), linear_method)
    assert not (tmp_path / "w").exists()


def test_a_finished_workdir_with_fewer_steps_is_refused_and_left_as_it_was(tmp_path, capsys):
    trainer.train_and_evaluate(linear_config(steps=4), str(tmp_path), linear_method)
    before = {f: (tmp_path / f).read_bytes() for f in ("config.json", "metrics.jsonl",
                                                        "done.json")}
    with pytest.raises(workdir_lib.WorkdirError) as e:
        trainer.train_and_evaluate(linear_config(steps=2), str(tmp_path), linear_method)
    assert str(e.value) == (f"{tmp_path} already finished at step 4 (> --config.train.steps=2); "
                            "use a new --workdir or raise --config.train.steps")
    capsys.readouterr()
    assert trainer.train_and_evaluate(linear_config(steps=4), str(tmp_path),
                                      linear_method) is None
    assert "already finished at step 4 (--config.train.steps=4); nothing to do" in \
        capsys.readouterr().out
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    # A checkpoint past the steps (a run stopped early, no done.json) is refused the same way.
    os.remove(tmp_path / "done.json")
    with pytest.raises(workdir_lib.WorkdirError, match="holds a checkpoint at step 4"):
        trainer.train_and_evaluate(linear_config(steps=3), str(tmp_path), linear_method)
    assert not (tmp_path / "lock.json").exists()


def test_full_disk_writing_the_workdir_is_one_line_and_releases_the_lock(tmp_path, monkeypatch):
    real_write = files.write_bytes

    def full(path, data):
        if str(path).endswith("config.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(files, "write_bytes", full)
    with pytest.raises(workdir_lib.WorkdirError) as e:
        trainer.train_and_evaluate(linear_config(steps=2), str(tmp_path), linear_method)
    assert str(e.value).startswith(f"cannot write {tmp_path}/config.json: no space left")
    assert not (tmp_path / "lock.json").exists()


def test_full_disk_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    def full(self, step, *args, **kwargs):  # what tensorstore raised on a full tmpfs
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at '
                         f'local file "{self.directory}/{step}.orbax-checkpoint-tmp/": Failed to '
                         "write 58424 bytes to file 21: No space left on device "
                         "[os_error_code='28']")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        trainer.train_and_evaluate(linear_config(steps=2), str(tmp_path), linear_method)
    assert str(e.value).startswith(f"cannot save checkpoint {tmp_path}/checkpoints/1: no space "
                                   "left on the device; free space")
    assert not (tmp_path / "lock.json").exists()
