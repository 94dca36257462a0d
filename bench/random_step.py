"""A method's real jitted train step on random weights and a random batch, for benchmarks.

The method is built abstractly, as plan mode builds it (no checkpoint, no data: the frozen
weights are ``jax.ShapeDtypeStruct``s), then every frozen leaf is filled with random values of
its shape, dtype and sharding, and the batch with random values of the method's ``batch_spec``.
Speed does not depend on the values; the fills only keep the numbers finite (norm scales 1,
biases 0, probability vectors uniform, token ids inside the vocabulary).

Used by bench/device.py (paper sizes on an accelerator) and bench/vs_authors_lqae.py (our side).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lqae_vlap.core import sharding as sharding_lib  # noqa: E402
from lqae_vlap.train import trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """configs/NAME.py's get_config(arg), loaded by path (works without the package installed)."""
    import importlib.util  # noqa: PLC0415

    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def write_hf_config(folder: str, fields: dict[str, Any]) -> str:
    """Writes ``fields`` (HF config fields incl. model_type) as FOLDER/config.json; returns FOLDER.

    An abstract build reads a local folder's config.json alone, so this is a checkpoint "of"
    an architecture without any weight file.
    """
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(fields, f)
    return folder


def roberta_fields(vocab: int, width: int, depth: int, heads: int, ffn: int) -> dict[str, Any]:
    """A RoBERTa masked LM's HF config fields (roberta-base's layout at the given sizes)."""
    return dict(model_type="roberta", architectures=["RobertaForMaskedLM"], vocab_size=vocab,
                hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                intermediate_size=ffn, max_position_embeddings=514, type_vocab_size=1,
                hidden_act="gelu", layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                eos_token_id=2, tie_word_embeddings=True)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path).lower()


def _fill(name: str, shape: tuple[int, ...], dtype, key: jax.Array, vocab: int) -> jax.Array:
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.zeros(shape, dtype)  # token ids (prompt, mask id): 0 is always a valid id
    last = name.split("/")[-1]
    if "marginal" in last:  # a probability vector over the words
        return jnp.full(shape, 1.0 / max(int(np.prod(shape)), 1), dtype)
    if last in ("scale", "weight") and len(shape) == 1:  # norm scales
        return jnp.ones(shape, dtype)
    if last == "bias" or "bias" in last:
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def materialize(tree: Any, seed: int = 0, vocab: int = 0) -> Any:
    """Random arrays for every ``jax.ShapeDtypeStruct`` leaf, placed with the leaf's sharding
    (one jitted program for the whole tree: one compile, not one per leaf)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs = [(_path_name(path), tuple(leaf.shape), leaf.dtype) for path, leaf in leaves]
    shardings = [getattr(leaf, "sharding", None) for _, leaf in leaves]

    def fill(key):
        keys = jax.random.split(key, max(len(specs), 1))
        return [_fill(n, s, d, k, vocab) for (n, s, d), k in zip(specs, keys)]

    out = jax.jit(fill, out_shardings=shardings)(jax.random.PRNGKey(seed))
    return jax.tree_util.tree_unflatten(treedef, out)


def random_batch(spec: dict[str, jax.ShapeDtypeStruct], mesh, vocab: int,
                 seed: int = 0) -> dict[str, jax.Array]:
    """A batch of ``spec``'s shapes: uint8 images uniform in 0..255, ``*_ids`` uniform in
    [3, vocab) (past the special ids), ``*_mask`` all ones, floats uniform in [-1, 1]."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in spec.items():
        if s.dtype == jnp.uint8:
            v = rng.integers(0, 256, s.shape, dtype=np.uint8)
        elif k.endswith("mask"):
            v = np.ones(s.shape, s.dtype)
        elif jnp.issubdtype(s.dtype, jnp.integer):
            v = rng.integers(3, max(vocab, 4), s.shape).astype(s.dtype)
        else:
            v = rng.uniform(-1, 1, s.shape).astype(s.dtype)
        out[k] = jax.device_put(v, sharding_lib.batch_sharding(mesh, len(s.shape)))
    return out


def _flops(cost: Any) -> float:
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _merge(config: ml_collections.ConfigDict, overrides: Any) -> None:
    for key, value in overrides.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            _merge(config[key], value)
        else:
            config[key] = value


@dataclasses.dataclass
class Prepared:
    """A compiled train step with its inputs. ``run(n)`` times n steps (seconds each)."""

    step: Any
    state: Any
    frozen: Any
    batch: dict[str, jax.Array]
    compile_s: float
    temp_bytes: int
    argument_bytes: int
    flops: float  # per step, every loop iteration counted (see ``prepare``)
    flops_as_configured: float  # the lowered step as configured (loop bodies once)
    flops_compiled: float  # the optimised program's own count (loop bodies once)
    describe: str
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # of the last step

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.state, metrics = self.step(self.state, self.frozen, self.batch)
            jax.block_until_ready((self.state, metrics))
            times.append(time.perf_counter() - t)
        self.metrics = {k: float(v) for k, v in metrics.items()}
        return times


def prepare(config: ml_collections.ConfigDict, build, *, vocab_hint: int = 0,
            seed: int = 0) -> Prepared:
    """Builds ``build(config, mesh, abstract=True)`` (a method's ``build``), fills it with random
    weights, compiles the trainer's own train step and runs it once (warm-up).

    FLOPs are XLA's cost analysis of the lowered (not yet optimised, so backend-independent)
    train step: every dot counts 2 M N K. XLA counts a while-loop body once whatever its trip
    count, so where the config names ``plan.flops_overrides`` (LQAE: the codebook search made a
    single chunk), the FLOPs come from a second program lowered with them (never compiled or
    run), as plan mode does. Frozen weights get no gradient in these steps, so the frozen model
    counts as its forward plus the backward through its activations (about 2x its forward), the
    trainable parts as forward + both backward products. ``flops_compiled`` is the optimised
    program's own count, for comparison.
    """
    mesh = sharding_lib.make_mesh(config.mesh)
    method = build(config, mesh, abstract=True)
    tx, schedule = trainer.make_optimizer(config.optim, int(config.train.steps),
                                          config.data.batch_size)
    init_fn, abstract_state, state_shardings = trainer.build_state(method, tx, mesh, config.seed)
    batch_shardings = {k: sharding_lib.batch_sharding(mesh, len(v.shape))
                       for k, v in method.batch_spec.items()}
    step = trainer.make_train_step(method, tx, schedule, config.seed, state_shardings,
                                   batch_shardings, mesh)
    frozen = materialize(method.frozen, seed=seed, vocab=vocab_hint)
    batch = random_batch(method.batch_spec, mesh, vocab_hint, seed=seed)
    state = init_fn()
    lowered = step.lower(state, frozen, batch)
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    memory = compiled.memory_analysis()
    flops_compiled = _flops(compiled.cost_analysis())
    flops = flops_as_configured = _flops(lowered.cost_analysis())
    overrides = config.get("plan", {}).get("flops_overrides", {})
    if overrides:
        counting = config.copy_and_resolve_references()
        _merge(counting, overrides)
        m2 = build(counting, mesh, abstract=True)
        step2 = trainer.make_train_step(m2, tx, schedule, config.seed, state_shardings,
                                        batch_shardings, mesh)
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
                          for k, v in method.batch_spec.items()}
        flops = _flops(step2.lower(abstract_state, m2.frozen, abstract_batch).cost_analysis())
    prepared = Prepared(step=step, state=state, frozen=frozen, batch=batch, compile_s=compile_s,
                        temp_bytes=int(getattr(memory, "temp_size_in_bytes", 0)),
                        argument_bytes=int(getattr(memory, "argument_size_in_bytes", 0)),
                        flops=flops, flops_as_configured=flops_as_configured,
                        flops_compiled=flops_compiled, describe=method.describe)
    prepared.run(1)  # warm-up: the first call also transfers and allocates
    return prepared
