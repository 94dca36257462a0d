"""Plan mode (``--config.mode=plan``): will this config fit, and how fast can it go, before launch?

Builds the method abstractly (no weights read, ``jax.eval_shape``), lowers and compiles the real
train step for the configured mesh, and reports parameter counts, bytes per device (parameters,
optimizer state, frozen weights, and XLA's temporaries from the compiled memory analysis), FLOPs
per step from the compiled cost analysis, and the step time those FLOPs imply at a stated peak.

Without an accelerator, main.py gives JAX ``plan.num_devices`` fake CPU devices so a pod's mesh
can be compiled on a laptop; XLA's CPU memory figures then stand in for the accelerator's. The
CPU compile uses XLA:CPU's memory-optimised scheduler (``plan.cpu_memory_scheduler``): the
default one orders for thread concurrency and keeps e.g. every rematerialised layer's
recomputation alive at once, which no accelerator compiler does (their schedulers bound memory).
XLA:CPU also computes bfloat16 matmuls in float32, with float32 copies of their operands, so a
bfloat16 model's temporaries on CPU overstate an accelerator's.

Rematerialisation 'auto': every key under ``config.model`` whose name ends in ``remat`` and whose
value is 'auto' is tried with each policy of REMAT_ORDER (fewest FLOPs first); each one's bytes
and FLOPs are printed and the first that fits is reported (the last one when none does).
"""

from __future__ import annotations

from collections.abc import Callable
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


def _compiler_options(config: ml_collections.ConfigDict) -> dict[str, str]:
    if jax.devices()[0].platform == "cpu" and config.plan.get("cpu_memory_scheduler", True):
        return dict(CPU_MEMORY_SCHEDULER)
    return {}


def plan(config: ml_collections.ConfigDict, build_method: Callable[..., Method],
         mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
    """Compiles the train step abstractly and returns (and prints) the plan's figures.

    mesh: defaults to ``config.mesh`` over all devices. With remat keys set to 'auto' (module
    docstring), each policy is planned and the report of the chosen one is returned, with
    'remat' (its index in REMAT_ORDER) and 'remat_tried' (how many were planned).
    """
    mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
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
    options = _compiler_options(config)
    compiled = step.lower(abstract_state, method.frozen, batch).compile(compiler_options=options)
    memory = compiled.memory_analysis()
    flops = _flops(compiled)  # of the per-device (SPMD-partitioned) program
    if config.plan.get("flops_overrides"):
        # XLA's cost analysis counts a while-loop body once, whatever its trip count; a second
        # compile with the loops made single-trip (e.g. one codebook chunk) counts every FLOP.
        # It is only lowered and compiled, never run, so its larger temporaries do not matter.
        counting = config.copy_and_resolve_references()
        _merge(counting, config.plan.flops_overrides)
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
    report["step_seconds_at_peak"] = flops / (p.peak_tflops * 1e12) if p.peak_tflops else 0.0
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
        f"plan for mesh {dict(mesh.shape)} ({int(r['devices'])} {jax.devices()[0].platform} devices)",
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
        f"  step time at {p.peak_tflops:g} TFLOP/s per device (100% of peak): "
        f"{r['step_seconds_at_peak'] * 1e3:.4g} ms",
    ]), flush=True)
