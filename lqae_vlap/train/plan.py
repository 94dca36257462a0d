"""Plan mode (``--config.mode=plan``): will this config fit, and how fast can it go, before launch?

Builds the method abstractly (no weights read, ``jax.eval_shape``), lowers and compiles the real
train step for the configured mesh, and reports parameter counts, bytes per device (parameters,
optimizer state, frozen weights, and XLA's temporaries from the compiled memory analysis), FLOPs
per step from the compiled cost analysis, and the step time those FLOPs imply at a stated peak
(``plan.peak_tflops``; 0 = the target chip's bf16 peak, PEAK_TFLOPS).

Without an accelerator, main.py gives JAX ``plan.num_devices`` fake CPU devices so a pod's mesh
can be compiled on a laptop; XLA's CPU memory figures then stand in for the accelerator's. The
CPU compile uses XLA:CPU's memory-optimised scheduler (``plan.cpu_memory_scheduler``): the
default one orders for thread concurrency and keeps e.g. every rematerialised layer's
recomputation alive at once, which no accelerator compiler does (their schedulers bound memory).
XLA:CPU also computes bfloat16 matmuls in float32, with float32 copies of their operands, so a
bfloat16 model's temporaries on CPU overstate an accelerator's.

Deviceless TPU target (``plan.target='tpu:v5e:2x4'``): the step is instead compiled ahead of time
by the TPU compiler in libtpu for that topology's chips (``jax.experimental.topologies``), on this
CPU-only machine; its memory figures are the TPU's own (bfloat16 matmuls, its scheduler and
rematerialisation). libtpu comes from ``pip install 'jax[tpu]'``, from ``plan.libtpu`` (the path
of libtpu.so, or a ``pip install --target DIR libtpu`` folder), or from $TPU_LIBRARY_PATH.

Rematerialisation 'auto': every key under ``config.model`` whose name ends in ``remat`` and whose
value is 'auto' is tried with each policy of REMAT_ORDER (fewest FLOPs first); each one's bytes
and FLOPs are printed and the first that fits is reported (the last one when none does).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from lqae_vlap.core import sharding as sharding_lib
from lqae_vlap.methods.method import Method
from lqae_vlap.train import trainer

GIB = 2 ** 30
# models/layers.py's REMAT_POLICIES in order of FLOPs (train imports no model code).
REMAT_ORDER = ("none", "dots", "full")
CPU_MEMORY_SCHEDULER = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
# plan.target 'tpu:GENERATION:CHIPS' -> HBM per chip in GiB (what device_memory_gib should say).
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Dense bf16 peak per chip in TFLOP/s (published figures): what turns FLOPs into a step time
# when plan.peak_tflops is 0; 'cpu' (fake devices standing in for GPUs) assumes an H100 SXM.
PEAK_TFLOPS = {"cpu": 989.0, "v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
TARGET_HELP = ("'cpu' (default: fake CPU devices) or 'tpu:GEN:AxB[xC]' with GEN one of "
               + ", ".join(TPU_HBM_GIB) + " (e.g. 'tpu:v5e:2x4' = 8 v5e chips of 16 GiB)")


def parse_target(target: str) -> tuple[str, str]:
    """'' / 'cpu' -> ('cpu', ''); 'tpu:v5e:2x4' -> ('tpu', 'v5e:2x4'); else one-line ValueError."""
    target = (target or "cpu").strip()
    if target == "cpu":
        return "cpu", ""
    m = re.fullmatch(r"tpu:(v[0-9a-z]+):([0-9]+(x[0-9]+){1,2})", target)
    if m is None or m.group(1) not in TPU_HBM_GIB:
        raise ValueError(f"config.plan.target={target!r} is not a plan target; use {TARGET_HELP}")
    return "tpu", f"{m.group(1)}:{m.group(2)}"


def peak_tflops(plan_config: ml_collections.ConfigDict) -> float:
    """plan.peak_tflops, or with 0 the bf16 peak of plan.target's chip (PEAK_TFLOPS)."""
    given = float(plan_config.get("peak_tflops", 0.0) or 0.0)
    if given < 0:
        raise ValueError(f"config.plan.peak_tflops={given:g} must be >= 0 (0: the target's peak)")
    if given:
        return given
    kind, topology = parse_target(plan_config.get("target", ""))
    return PEAK_TFLOPS["cpu" if kind == "cpu" else topology.split(":")[0]]


def _libtpu_file(libtpu: str) -> str:
    """plan.libtpu (libtpu.so, or a folder holding libtpu/libtpu.so) -> the .so's path."""
    if os.path.isfile(libtpu):
        return libtpu
    found = [f for f in (os.path.join(libtpu, "libtpu", "libtpu.so"),
                         os.path.join(libtpu, "libtpu.so")) if os.path.isfile(f)]
    if not found:
        raise ValueError(f"config.plan.libtpu={libtpu!r} is neither libtpu.so nor a folder with "
                         "libtpu/libtpu.so; install one with pip install --no-deps --target DIR "
                         "libtpu (the version jax[tpu] pins) and pass DIR")
    return found[0]


def target_devices(target: str, libtpu: str = "") -> Sequence[jax.Device] | None:
    """The compile-only devices of ``target`` (None for 'cpu': plan on jax.devices()).

    A TPU target loads libtpu as a PJRT plugin beside the CPU backend (which stays the default:
    nothing runs on the TPU devices, they have no chips behind them) and asks it for the named
    topology, whose devices a mesh can be built from and a step compiled for.
    """
    kind, topology = parse_target(target)
    if kind == "cpu":
        return None
    from jax.experimental import topologies

    if libtpu:
        os.environ["TPU_LIBRARY_PATH"] = _libtpu_file(libtpu)
    if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*")):
        # Off a TPU VM libtpu would query the GCE metadata server and warn about its absent
        # workers; the topology name says all it needs. Its lock file (one process per TPU VM's
        # chips) would stop a second plan on this machine, though a compile holds no chip.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")  # any valid name: unused here
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except RuntimeError as e:  # no libtpu, or one that rejects the topology
        msg = " ".join(str(e).split())
        if "not installed" in msg:
            msg = ("libtpu is not installed: pip install 'jax[tpu]', or pip install --no-deps "
                   "--target DIR 'libtpu==<the version jax[tpu] pins>' and pass "
                   "--config.plan.libtpu=DIR")
        raise ValueError(f"config.plan.target={target!r}: {msg}") from None


def bytes_per_device(tree: Any) -> int:
    """Largest per-device footprint of a tree of arrays / ShapeDtypeStructs with shardings."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        itemsize = np.dtype(leaf.dtype).itemsize
        if sharding is None:
            shard, devices = leaf.shape, [None]
        else:
            shard, devices = sharding.shard_shape(leaf.shape), list(sharding.device_set)
        for d in devices:
            per_device[d] = per_device.get(d, 0) + int(np.prod(shard)) * itemsize
    return max(per_device.values(), default=0)


def count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _merge(config: ml_collections.ConfigDict, overrides) -> None:
    """Sets nested ``overrides`` ({'quantizer': {'chunk_size': 4}}) into ``config`` in place."""
    for key, value in overrides.items():
        if key not in config:
            raise ValueError(f"config.plan.flops_overrides names {key!r}, which the config lacks")
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            _merge(config[key], value)
        else:
            config[key] = value


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def auto_remat_keys(config: ml_collections.ConfigDict) -> list[tuple[str, ...]]:
    """Paths under ``config.model`` of the keys ending in 'remat' that are set to 'auto'."""
    found = []

    def walk(node, path):
        for key in node.keys():
            value = node[key]
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, path + (key,))
            elif key.endswith("remat") and value == "auto":
                found.append(path + (key,))

    if "model" in config:
        walk(config.model, ("model",))
    return found


def _set(config: ml_collections.ConfigDict, path: tuple[str, ...], value) -> None:
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _platform(mesh: jax.sharding.Mesh) -> str:
    return mesh.devices.flat[0].platform


def _compiler_options(config: ml_collections.ConfigDict, mesh) -> dict[str, str]:
    if _platform(mesh) == "cpu" and config.plan.get("cpu_memory_scheduler", True):
        return dict(CPU_MEMORY_SCHEDULER)
    return {}


def plan(config: ml_collections.ConfigDict, build_method: Callable[..., Method],
         mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
    """Compiles the train step abstractly and returns (and prints) the plan's figures.

    mesh: defaults to ``config.mesh`` over all devices, or over ``config.plan.target``'s. With
    remat keys set to 'auto' (module docstring), each policy is planned and the report of the
    chosen one is returned, with 'remat' (its index in REMAT_ORDER) and 'remat_tried' (how many
    were planned).
    """
    if mesh is None:
        devices = target_devices(config.plan.get("target", ""), config.plan.get("libtpu", ""))
        mesh = sharding_lib.make_mesh(config.mesh, devices)
    keys = auto_remat_keys(config)
    if not keys:
        return _plan_one(config, build_method, mesh)
    names = ", ".join(".".join(k) for k in keys)
    chosen = None
    for i, policy in enumerate(REMAT_ORDER):
        trial = config.copy_and_resolve_references()
        for k in keys:
            _set(trial, k, policy)
        if jax.process_index() == 0:
            print(f"plan: {names} = {policy!r}", flush=True)
        report = _plan_one(trial, build_method, mesh)
        report.update(remat=float(i), remat_tried=float(i + 1))
        chosen = report
        if report["fits"]:
            break
    if jax.process_index() == 0:
        policy = REMAT_ORDER[int(chosen["remat"])]
        verdict = "the cheapest that fits" if chosen["fits"] else "none fits; the least memory"
        print(f"plan: {names} = {policy!r} ({verdict}); set it in the config to train",
              flush=True)
    return chosen


def _plan_one(config: ml_collections.ConfigDict, build_method: Callable[..., Method],
              mesh: jax.sharding.Mesh) -> dict[str, float]:
    method = build_method(config, mesh, abstract=True)
    if method.describe and jax.process_index() == 0:
        print(method.describe, flush=True)  # says where the architecture came from
    tx, schedule = trainer.make_optimizer(config.optim, int(config.train.steps),
                                          config.data.batch_size)
    _, abstract_state, state_shardings = trainer.build_state(method, tx, mesh, config.seed)
    batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim)
                       for k, v in method.batch_spec.items()}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
             for k, v in method.batch_spec.items()}
    step = trainer.make_train_step(method, tx, schedule, config.seed, state_shardings,
                                   batch_shardings, mesh)
    options = _compiler_options(config, mesh)
    compiled = step.lower(abstract_state, method.frozen, batch).compile(compiler_options=options)
    memory = compiled.memory_analysis()
    flops = _flops(compiled)  # of the per-device (SPMD-partitioned) program
    counting = config.copy_and_resolve_references()
    _merge(counting, config.plan.get("flops_overrides") or {})
    if counting.to_dict() != config.to_dict():  # an override that changes nothing compiles once
        # XLA's cost analysis counts a while-loop body once, whatever its trip count; a second
        # compile with the loops made single-trip (e.g. one codebook chunk) counts every FLOP.
        # It is only lowered and compiled, never run, so its larger temporaries do not matter.
        m2 = build_method(counting, mesh, abstract=True)
        step2 = trainer.make_train_step(m2, tx, schedule, config.seed, state_shardings,
                                        batch_shardings, mesh)
        flops = _flops(step2.lower(abstract_state, m2.frozen, batch).compile(
            compiler_options=options))

    p = config.plan
    n = mesh.devices.size
    report = {
        "devices": n,
        "trainable_params": count(abstract_state["params"]),
        "frozen_params": count(method.frozen),
        "params_bytes_per_device": bytes_per_device(abstract_state["params"]),
        "opt_state_bytes_per_device": bytes_per_device(abstract_state["opt_state"]),
        "frozen_bytes_per_device": bytes_per_device(method.frozen),
        "batch_bytes_per_device": bytes_per_device(batch),
        "temp_bytes_per_device": int(getattr(memory, "temp_size_in_bytes", 0)),
        "flops_per_device_per_step": flops,
        "flops_per_step": flops * n,
    }
    total = sum(report[k] for k in ("params_bytes_per_device", "opt_state_bytes_per_device",
                                    "frozen_bytes_per_device", "batch_bytes_per_device",
                                    "temp_bytes_per_device"))
    report["total_bytes_per_device"] = total
    report["device_memory_bytes"] = int(p.device_memory_gib * GIB)
    report["fits"] = float(total <= report["device_memory_bytes"])
    peak = peak_tflops(p)
    report["peak_tflops"] = peak
    report["step_seconds_at_peak"] = flops / (peak * 1e12)
    _print(report, mesh, p)
    return report


def _print(r: dict[str, float], mesh, p) -> None:
    if jax.process_index() != 0:
        return
    def g(key: str) -> str:
        b = r[key]
        return f"{b / GIB:9.3f} GiB" if b >= GIB / 10 else f"{b / 2 ** 20:9.3f} MiB"

    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    print("\n".join([
        f"plan for mesh {dict(mesh.shape)} ({int(r['devices'])} {_platform(mesh)} devices"
        + (f": {mesh.devices.flat[0].device_kind}, compiled ahead of time)"
           if _platform(mesh) != "cpu" else ")"),
        f"  parameters: {int(r['trainable_params']):,} trainable, "
        f"{int(r['frozen_params']):,} frozen",
        "  per device:",
        f"    trainable params   {g('params_bytes_per_device')}",
        f"    optimizer state    {g('opt_state_bytes_per_device')}",
        f"    frozen weights     {g('frozen_bytes_per_device')}",
        f"    batch              {g('batch_bytes_per_device')}",
        f"    XLA temporaries    {g('temp_bytes_per_device')}  (compiled memory analysis)",
        f"    total              {g('total_bytes_per_device')}  of {p.device_memory_gib:g} GiB: "
        f"{verdict}",
        f"  FLOPs per step: {r['flops_per_step']:.4g} ({r['flops_per_device_per_step']:.4g} per "
        "device, compiled cost analysis)",
        f"  step time at {r['peak_tflops']:g} TFLOP/s per device (100% of peak): "
        f"{r['step_seconds_at_peak'] * 1e3:.4g} ms",
    ]), flush=True)
