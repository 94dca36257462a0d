"""Joining a multi-process (multi-controller) JAX run: TPU pods, SLURM, or explicit variables.

JAX's own runtime does the work; this only decides whether and how to call
``jax.distributed.initialize`` before anything else touches a device:
  - explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i
    (or the same as main.py flags), e.g. several processes on one machine or any cluster;
  - TPU pod slices (several TPU VM workers) and SLURM jobs with several tasks: auto-detected by JAX.
A single process (a laptop, one GPU host driving all its GPUs, a single TPU VM) does nothing.
"""

from __future__ import annotations

import os

import jax


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def _slurm_multi_task() -> bool:
    return "SLURM_JOB_ID" in os.environ and (_env_int("SLURM_NTASKS") or 1) > 1


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when this is one of several processes.

    Arguments default to JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Returns
    whether a multi-process run was joined. Must run before any JAX computation.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes or _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = coordinator_address is not None and (num_processes or 1) > 1
    if explicit:
        if process_id is None or not 0 <= process_id < num_processes:
            raise ValueError(
                f"multi-process run with {num_processes} processes needs JAX_PROCESS_ID (or "
                f"--process_id) in [0, {num_processes}); got {process_id}")
    elif not (_tpu_pod() or _slurm_multi_task()):
        return False
    # CPU devices need a collectives backend to talk across processes (tests, CPU clusters).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return True
