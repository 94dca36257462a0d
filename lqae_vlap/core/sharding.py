"""Device mesh, the one table of partition rules, and helpers to lay out pytrees on the mesh.

Every weight in the project carries logical axis names (``nn.with_logical_partitioning``); this file
alone decides which mesh axis each logical name lands on, so the same train step runs on one CPU,
one GPU or a pod slice and only ``config.mesh`` changes.

Mesh axes:
  data:   pure data parallelism (parameters replicated).
  fsdp:   data parallelism with parameters and optimizer state sharded along their ``embed`` axis.
  tensor: model parallelism (MLP hidden, attention heads, vocabulary).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes). Names not listed are replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    # weights
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("position", None),
    ("norm", None),
)


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves ``{'data': -1, 'fsdp': 2, 'tensor': 1}`` into sizes whose product is num_devices.

    At most one axis may be -1 ("the rest").
    """
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}")
    sizes = [int(spec.get(a, 1)) for a in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(spec)}")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
        raise ValueError(
            f"config.mesh {dict(spec)} does not divide the {num_devices} available devices; "
            "set the axis sizes so their product equals the device count (use -1 for one axis)")
    if free:
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"config.mesh {dict(spec)} uses {fixed} devices but {num_devices} are available; "
            "set one axis to -1 to absorb the rest")
    return tuple(sizes)


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_sharding(logical_specs: Any, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """Maps a pytree of logical PartitionSpecs to NamedShardings on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def boxed_shardings(boxed_tree: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """NamedShardings for a (possibly abstract) tree of ``nn.LogicallyPartitioned`` leaves.

    Leaves without logical names are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return logical_to_sharding(specs, mesh, rules)


def fit_sharding_to_shape(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """Drops mesh axes from dimensions they do not divide (e.g. a vocab of 30,522 over 4 devices)."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    mesh = sharding.mesh
    fixed = []
    for dim, axes in zip(shape, spec):
        if axes is None:
            fixed.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        fixed.append(axes if dim % size == 0 else None)
    return NamedSharding(mesh, P(*fixed))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Places a host (numpy or jax) pytree on the mesh, fitting each sharding to its leaf's shape."""
    return jax.tree.map(
        lambda x, s: jax.device_put(x, fit_sharding_to_shape(s, np.shape(x))), tree, shardings)


def unbox(tree: Any) -> Any:
    """Strips ``nn.LogicallyPartitioned`` boxes, leaving plain arrays."""
    return nn.meta.unbox(tree)
