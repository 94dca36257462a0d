"""The training loop shared by every method.

The trainer knows a method only through the ``Method`` record it is handed (methods/method.py):
how to initialise trainable params, the frozen tree, the loss, the data, and the evaluations with
their cadence. It owns the mesh, shardings, optimizer, checkpoints, metrics and the loop.

Determinism: batch ``s`` is a pure function of (data seed, s) and the step's rng is
``fold_in(PRNGKey(seed), s)``, so a run that is killed and resumed from a checkpoint ends with the
same parameters as one that never stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lqae_vlap.core import files
from lqae_vlap.core import sharding as sharding_lib
from lqae_vlap.methods.method import Method
from lqae_vlap.train import checkpoint as ckpt_lib
from lqae_vlap.train import metrics as metrics_lib

PyTree = Any


def decay_mask(params: PyTree) -> PyTree:
    """Weight decay on matrices only: not on biases, norms, embeddings or position tables."""

    def keep(path, leaf):
        names = "/".join(str(getattr(k, "key", k)) for k in path).lower()
        return leaf.ndim >= 2 and "embed" not in names.split("/")[-1] and "pos" not in names

    return jax.tree_util.tree_map_with_path(keep, params)


# optim.weight_decay_mask: which trainable leaves AdamW decays. 'matrices': ``decay_mask``;
# 'all': every leaf, biases too, as torch.optim.AdamW(model.parameters()) does (VLAP's script).
DECAY_MASKS = ("matrices", "all")


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   global_batch_size: int) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with linear warm-up and cosine decay; lr optionally scaled by batch / reference."""
    which = optim.get("weight_decay_mask", "matrices")
    if which not in DECAY_MASKS:
        raise ValueError(f"config.optim.weight_decay_mask={which!r} is not known; use one of "
                         f"{DECAY_MASKS}")
    peak = optim.lr
    if optim.get("lr_scale_batch", 0):
        peak = optim.lr * global_batch_size / optim.lr_scale_batch
    warmup = int(min(optim.warmup_steps, max(total_steps - 1, 0)))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * optim.get("end_lr_ratio", 0.0))
    chain = []
    if optim.get("grad_clip", 0):
        chain.append(optax.clip_by_global_norm(optim.grad_clip))
    chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.get("eps", 1e-8),
                             weight_decay=optim.weight_decay,
                             mask=decay_mask if which == "matrices" else None))
    return optax.chain(*chain), schedule


def _leaf_shardings(abstract: PyTree, mesh) -> PyTree:
    """Shardings from logical names, fitted to each leaf's shape (unnamed leaves replicated)."""
    named = sharding_lib.boxed_shardings(abstract, mesh)
    shapes = jax.tree.map(lambda a: a.shape, sharding_lib.unbox(abstract))
    return jax.tree.map(sharding_lib.fit_sharding_to_shape, named, shapes,
                        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))


def _to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding_lib.batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items()}


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def build_state(method: Method, tx: optax.GradientTransformation, mesh,
                seed: int) -> tuple[Callable[[], PyTree], PyTree, PyTree]:
    """Returns (init_fn, abstract state, state shardings); init_fn creates the state on the mesh."""

    def init(rng):
        params = method.init_params(rng)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    rng = jax.random.PRNGKey(seed)
    boxed = jax.eval_shape(init, rng)
    shardings = _leaf_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            sharding_lib.unbox(boxed), shardings)
    init_fn = jax.jit(lambda r: sharding_lib.unbox(init(r)), out_shardings=shardings)
    return (lambda: init_fn(rng)), abstract, shardings


def frozen_shardings(frozen: PyTree) -> PyTree:
    """The shardings the frozen tree was placed with (arrays or ShapeDtypeStructs alike)."""
    return jax.tree.map(lambda x: x.sharding, frozen)


def make_train_step(method: Method, tx: optax.GradientTransformation, schedule, seed: int,
                    state_shardings: PyTree, batch_shardings: PyTree, mesh) -> Callable:
    base_rng = jax.random.PRNGKey(seed + 1)

    def train_step(state, frozen, batch):
        rng = jax.random.fold_in(base_rng, state["step"])
        grad_fn = jax.value_and_grad(method.loss_fn, has_aux=True)
        (loss, aux), grads = grad_fn(state["params"], frozen, batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state["step"])}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, frozen_shardings(method.frozen), batch_shardings),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        files.write_text(files.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       build_method: Callable[[ml_collections.ConfigDict, Any], Method]) -> PyTree:
    """Trains (or resumes) the method described by ``config``; returns the final state."""
    init_from = (ckpt_lib.find_checkpoint_dir(config.train.init_from)  # fail before any work
                 if config.train.get("init_from", "") else None)
    mesh = sharding_lib.make_mesh(config.mesh)
    _log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
         f"device(s), {jax.process_count()} process(es)")
    method = build_method(config, mesh)
    if method.describe:
        _log(method.describe)
    total = int(config.train.steps)
    tx, schedule = make_optimizer(config.optim, total, config.data.batch_size)
    init_state, abstract_state, state_shardings = build_state(method, tx, mesh, config.seed)

    files.makedirs(workdir)  # only now: a run that fails to build leaves no workdir behind
    checkpointer = ckpt_lib.Checkpointer(
        files.join(workdir, "checkpoints"), save_every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints, async_save=config.train.get("async_checkpoint", True))
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(abstract_state)
        _log(f"resumed from {checkpointer.directory}/{int(state['step'])}")
    elif init_from is not None:
        directory, step = init_from
        source = ckpt_lib.Checkpointer(directory, save_every=1, keep=1, async_save=False)
        state = init_state()
        state["params"] = source.restore(abstract_state, step)["params"]
        _log(f"initialised params from {directory} (step {step or source.latest_step()})")
    else:
        state = init_state()
    _save_config(config, workdir)

    start = int(state["step"])
    counts = {k: int(sum(np.prod(x.shape) for x in jax.tree.leaves(t)))
              for k, t in (("trainable", state["params"]), ("frozen", method.frozen))}
    _log(f"parameters: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen")

    sample = method.train_batches.batch_at(0)
    batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in sample.items()}
    step_fn = make_train_step(method, tx, schedule, config.seed, state_shardings, batch_shardings,
                              mesh)
    writer = metrics_lib.MetricWriter(workdir, active=jax.process_index() == 0)
    progress = metrics_lib.Progress(total, start)
    log_every = max(int(config.train.log_every), 1)

    def run_eval(step: int, names) -> None:
        if method.evaluate is None or not names:
            return
        scalars = method.evaluate(state["params"], method.frozen, step, workdir, names)
        scalars = writer.write(step, {f"eval/{k}": v for k, v in scalars.items()})
        _log(f"eval step {step}: {len(scalars)} numbers in metrics.jsonl and "
             f"eval_*_{step:06d}.json")

    preempted = False
    with ckpt_lib.PreemptionWatcher() as preemption:
        for step, batch in method.train_batches.iterate(start, total):
            if step >= total:
                break
            state, metrics = step_fn(state, method.frozen, _to_global(batch, mesh))
            done = step + 1
            if done % log_every == 0 or done == total:
                scalars = writer.write(done, jax.device_get(metrics))
                if not np.isfinite(scalars["loss"]):
                    raise FloatingPointError(f"loss is {scalars['loss']} at step {done}; lower "
                                             "config.optim.lr or check the data")
                _log(progress.line(done, scalars))
            checkpointer.maybe_save(done, state)
            if done != total:
                run_eval(done, method.evals_due(done))
            if (ckpt_lib.process_allgather_flag(preemption.requested)
                    or checkpointer.reached_preemption(done)):
                preempted = True
                break
    done = int(state["step"])
    checkpointer.maybe_save(done, state, force=True)
    checkpointer.close()
    if preempted:
        _log(f"preempted: saved step {done} to {checkpointer.directory}; "
             "run the same command again to resume")
    else:
        if done > 0:
            run_eval(done, list(method.eval_every))
        if jax.process_index() == 0:
            files.write_text(files.join(workdir, "done.json"), json.dumps({"step": done}))
    writer.close()
    return state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        build_method: Callable[[ml_collections.ConfigDict, Any], Method]) -> dict:
    """``mode=eval``: restores params (``train.init_from`` or the workdir's latest) and evaluates."""
    directory, step = ckpt_lib.find_checkpoint_dir(config.train.get("init_from", "") or workdir)
    mesh = sharding_lib.make_mesh(config.mesh)
    method = build_method(config, mesh)
    if method.evaluate is None:
        raise ValueError(f"method {config.method!r} has no evaluation")
    tx, _ = make_optimizer(config.optim, int(config.train.steps), config.data.batch_size)
    _, abstract_state, _ = build_state(method, tx, mesh, config.seed)
    checkpointer = ckpt_lib.Checkpointer(directory, save_every=1, keep=1, async_save=False)
    state = checkpointer.restore(abstract_state, step)
    step = int(state["step"])
    files.makedirs(workdir)
    writer = metrics_lib.MetricWriter(workdir, active=jax.process_index() == 0)
    scalars = writer.write(step, {f"eval/{k}": v
                                  for k, v in method.evaluate(state["params"], method.frozen,
                                                              step, workdir).items()})
    writer.close()
    _log(f"eval of {directory} step {step}: {len(scalars)} numbers in metrics.jsonl and "
         f"eval_*_{step:06d}.json")
    return scalars
