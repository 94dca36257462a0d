#!/usr/bin/env bash
# Run lqae_vlap on all GPUs of one machine: one process drives every local GPU (JAX's
# single-controller model), so there is nothing to coordinate and no process management.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_single_host.sh --config=configs/FILE.py --workdir=DIR [options] [--config.KEY=VALUE ...]

Runs `python -m lqae_vlap.main` once, driving every visible GPU of this machine. Checks first that
nvidia-smi sees GPUs and that the Python's jax has CUDA support.

Options:
  --gpus=0,1,...       only these GPUs (sets CUDA_VISIBLE_DEVICES; default: all)
  --mem-fraction=F     share of each GPU's memory JAX preallocates (default 0.90; JAX's own is 0.75)
  --python=PATH        the Python to use (default: $PYTHON, else python3)
  --dry-run            check, then print the environment and the command instead of running it
  -h, --help           this help
Everything of the form --config.KEY=VALUE is passed through to lqae_vlap.main; the mesh uses all
visible GPUs (e.g. --config.mesh.fsdp=-1 shards the weights over them).

Example:
  launch/gpu_single_host.sh --config=configs/lqae_roberta.py --workdir=/scratch/lqae \
      --config.data.data_dir=/data/tfds --config.mesh.fsdp=-1
EOF
}

die() { echo "error: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG=""; WORKDIR=""; GPUS=""; MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
PY="${PYTHON:-python3}"; DRY_RUN=0; PASSTHROUGH=()

while (($#)); do
  arg="$1"; shift
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; continue ;;
    --config.*) PASSTHROUGH+=("$arg"); continue ;;
  esac
  key="${arg%%=*}"
  if [[ "$arg" == *=* ]]; then val="${arg#*=}"
  else
    case "$key" in --config|--workdir|--gpus|--mem-fraction|--python) ;;
      *) die "unknown argument '$arg' (see --help; model settings go as --config.KEY=VALUE)" ;;
    esac
    (($#)) || die "$key needs a value, e.g. $key=VALUE"
    val="$1"; shift
  fi
  case "$key" in
    --config) CONFIG="$val" ;; --workdir) WORKDIR="$val" ;; --gpus) GPUS="$val" ;;
    --mem-fraction) MEM_FRACTION="$val" ;; --python) PY="$val" ;;
    *) die "unknown argument '$arg' (see --help; model settings go as --config.KEY=VALUE)" ;;
  esac
done

[[ -n "$CONFIG" ]] || die "missing --config=configs/FILE.py"
[[ -n "$WORKDIR" ]] || die "missing --workdir=DIR (checkpoints, metrics and outputs go there)"
[[ -f "${CONFIG%%:*}" ]] || die "--config=$CONFIG: no such file (from $(pwd)); run from the repo \
root, e.g. cd $REPO_ROOT"
[[ "$MEM_FRACTION" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction=$MEM_FRACTION must be \
a number in (0, 1], e.g. 0.9"
[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus=$GPUS must be a comma-separated \
list of GPU indices, e.g. --gpus=0,1"

command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found on PATH: this launcher needs \
an NVIDIA GPU and its driver (on CPU run python -m lqae_vlap.main directly)"
gpu_list="$(nvidia-smi -L 2>&1)" || die "nvidia-smi failed, is the NVIDIA driver loaded? It said: \
$gpu_list"
[[ "$gpu_list" == *GPU* ]] || die "nvidia-smi lists no GPUs: $gpu_list"
command -v "$PY" >/dev/null 2>&1 || die "python not found: '$PY' is not on PATH (pass --python=PATH \
or set PYTHON)"

[[ -n "$GPUS" ]] && export CUDA_VISIBLE_DEVICES="$GPUS"
export XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"
# Overlap the gradient all-reduce with compute across the local GPUs.
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
# A single process: keep main.py from trying to join a multi-process job left in the environment.
unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID
# Import lqae_vlap from this checkout even when it is not pip-installed.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# A CPU-only jaxlib would silently train on the CPU: insist on GPUs unless the user chose
# JAX_PLATFORMS themselves.
check='import os, sys
try:
    import jax
    devices = jax.devices()
except Exception as e:
    sys.exit(f"{type(e).__name__}: {e}".splitlines()[0])
if not os.environ.get("JAX_PLATFORMS") and devices[0].platform != "gpu":
    sys.exit(f"jax {jax.__version__} sees only {devices[0].platform} devices")
print(jax.__version__, len(devices), devices[0].platform)'
if ! jax_info="$("$PY" -c "$check" 2>&1)"; then
  die "jax in '$PY' cannot use the GPUs ($(printf '%s' "$jax_info" | tail -n 1)): install its \
CUDA build, e.g. $PY -m pip install -U 'jax[cuda12]'"
fi
read -r jax_version n_devices platform <<< "$(printf '%s' "$jax_info" | tail -n 1)"
echo "jax $jax_version sees $n_devices $platform device(s)" >&2
# From here on fail loudly rather than fall back to the CPU.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"

cmd=("$PY" -m lqae_vlap.main --config="$CONFIG" --workdir="$WORKDIR" "${PASSTHROUGH[@]}")
if ((DRY_RUN)); then
  for v in CUDA_VISIBLE_DEVICES JAX_PLATFORMS XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS PYTHONPATH; do
    [[ -n "${!v:-}" ]] && echo "$v=${!v}"
  done
  printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
  exit 0
fi
exec "${cmd[@]}"
