"""The training loop shared by every method.

The trainer knows a method only through the ``Method`` record it is handed (methods/method.py):
how to initialise trainable params, the frozen tree, the loss, the data, and the evaluations with
their cadence. It owns the mesh, shardings, optimizer, checkpoints, metrics and the loop.

Determinism: batch ``s`` is a pure function of (data seed, s) and the step's rng is
``fold_in(PRNGKey(seed), s)``, so a run that is killed and resumed from a checkpoint ends with the
same parameters as one that never stopped.

Failure: a step whose loss, gradients or updated weights are not finite is not applied (decided
on the device, every step) and the run stops before anything saves it, naming the step and the
last good checkpoint. Every exit path closes the checkpointer and releases the workdir's lock.
"""

from __future__ import annotations

import errno
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
from lqae_vlap.train import workdir as workdir_lib

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
        grad_norm = optax.tree.norm(grads)
        # One flag per step (NaN/inf in the loss, any gradient or any updated weight): where it
        # is false the state stays the last finite one, and the host stops the run on it.
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & ckpt_lib.all_finite(params))
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "finite": finite}
        return new, metrics

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, frozen_shardings(method.frozen), batch_shardings),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        files.write_text(files.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


class TrainingDiverged(RuntimeError):
    """A step produced NaN or infinity; the message names it and the checkpoint to resume."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run after saving; the message says where (main prints it
    and exits 130, as a program ended by Ctrl-C does, so a calling script stops too)."""


_POSITIVE_KEYS = ("steps", "checkpoint_every", "keep_checkpoints", "log_every")


def check_train_config(config: ml_collections.ConfigDict) -> int:
    """Checks config.train's counts before anything is built or written; returns the steps."""
    for key in _POSITIVE_KEYS:
        v = config.train.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
            raise ValueError(f"--config.train.{key}={v!r}: must be a whole number >= 1")
    return int(config.train.steps)


def _what_diverged(step: int, metrics: dict) -> str:
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not np.isfinite(loss):
        what = f"non-finite loss ({loss})"
    elif not np.isfinite(grad_norm):
        what = f"non-finite gradients (loss {loss:.4g})"
    else:
        what = f"non-finite weights after the update (loss {loss:.4g})"
    return (f"{what} at step {step} (lr {float(metrics['lr']):.4g} at that step); the step was "
            "not applied")


def _diverged(what: str, step: int, start: int, config: ml_collections.ConfigDict,
              checkpointer: ckpt_lib.Checkpointer) -> TrainingDiverged:
    try:
        checkpointer.wait()
    except ckpt_lib.CheckpointError:
        pass  # the save error is not this run's story; the steps on disk are
    steps = checkpointer.all_steps()
    lr = f"--config.optim.lr (now {config.optim.lr:g})"
    if not steps:
        return TrainingDiverged(f"{what}; no checkpoint was saved before it; run again with a "
                                f"lower {lr} to start over")
    last = f"{checkpointer.directory}/{steps[-1]}"
    if start > 0 and step == start + 1 and steps[-1] == start:
        # The very first step from a checkpoint diverged: its weights may be past saving (a
        # finite but exploded state), so the way back is an older step, if one is kept.
        older = (f"move {last} out of {checkpointer.directory} (say into "
                 f"{checkpointer.directory}_bad/) to resume from step {steps[-2]}"
                 if len(steps) > 1 else "start over in a new --workdir")
        return TrainingDiverged(
            f"{what}; it was the first step after resuming from {last}, whose weights may "
            f"already be too far gone: run with a lower {lr}, or {older}")
    return TrainingDiverged(f"{what}; the last good checkpoint is {last}; run the same command "
                            f"with a lower {lr} to resume from it")


def _workdir_os_error(e: OSError, workdir: str) -> Exception:
    """A write that failed for want of space or permission: one line naming the file (any
    other OSError is returned as it is)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the device; free space"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "not writable; fix its permissions"
    else:
        return e
    return workdir_lib.WorkdirError(
        f"cannot write {e.filename or workdir}: {why} or use another --workdir, then run the "
        "same command again (it resumes from the last complete checkpoint)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       build_method: Callable[[ml_collections.ConfigDict, Any], Method]
                       ) -> PyTree | None:
    """Trains (or resumes) the method described by ``config``; returns the final state (None
    when the workdir had already finished at ``config.train.steps``: nothing is done)."""
    total = check_train_config(config)
    workdir = files.normalize(workdir)
    notice = workdir_lib.preflight(workdir, total)  # reads only: bad input changes nothing
    if notice is not None:
        _log(notice)
        return None
    init_from = (ckpt_lib.find_checkpoint_dir(config.train.init_from)  # fail before any work
                 if config.train.get("init_from", "") else None)
    mesh = sharding_lib.make_mesh(config.mesh)
    _log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
         f"device(s), {jax.process_count()} process(es)")
    method = build_method(config, mesh)
    if method.describe:
        _log(method.describe)
    tx, schedule = make_optimizer(config.optim, total, config.data.batch_size)
    init_state, abstract_state, state_shardings = build_state(method, tx, mesh, config.seed)

    # Only now (a run that fails to build leaves no workdir behind) and only under the lock.
    try:
        with workdir_lib.WorkdirLock(workdir, _log), ckpt_lib.Checkpointer(
                files.join(workdir, "checkpoints"), save_every=config.train.checkpoint_every,
                keep=config.train.keep_checkpoints,
                async_save=config.train.get("async_checkpoint", True),
                writer=True) as checkpointer:
            return _train(config, workdir, method, tx, schedule, init_state, abstract_state,
                          state_shardings, mesh, checkpointer, init_from)
    except OSError as e:
        error = _workdir_os_error(e, workdir)
        if error is e:
            raise
        raise error from e


def _restore_or_init(checkpointer, workdir, init_state, abstract_state, init_from):
    state = checkpointer.restore_newest_usable(
        abstract_state, files.join(workdir, "checkpoints_bad"), _log)
    if state is not None:
        _log(f"resumed from {checkpointer.directory}/{int(state['step'])}")
    elif init_from is not None:
        directory, step = init_from
        with ckpt_lib.Checkpointer(directory, save_every=1, keep=1, async_save=False) as source:
            state = init_state()
            state["params"] = source.restore(abstract_state, step)["params"]
            _log(f"initialised params from {directory} (step {step or source.latest_step()})")
    else:
        state = init_state()
    return state


def _train(config, workdir, method, tx, schedule, init_state, abstract_state, state_shardings,
           mesh, checkpointer, init_from):
    total = int(config.train.steps)
    state = _restore_or_init(checkpointer, workdir, init_state, abstract_state, init_from)
    _save_config(config, workdir)

    start = int(state["step"])
    counts = {k: int(sum(np.prod(x.shape) for x in jax.tree.leaves(t)))
              for k, t in (("trainable", state["params"]), ("frozen", method.frozen))}
    _log(f"parameters: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen")

    sample = method.train_batches.batch_at(0)
    batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in sample.items()}
    step_fn = make_train_step(method, tx, schedule, config.seed, state_shardings, batch_shardings,
                              mesh)
    writer = metrics_lib.MetricWriter(workdir, active=jax.process_index() == 0,
                                      resume_step=start)
    progress = metrics_lib.Progress(total, start)
    log_every = int(config.train.log_every)

    def run_eval(step: int, names) -> None:
        if method.evaluate is None or not names:
            return
        scalars = method.evaluate(state["params"], method.frozen, step, workdir, names)
        scalars = writer.write(step, {f"eval/{k}": v for k, v in scalars.items()})
        _log(f"eval step {step}: {len(scalars)} numbers in metrics.jsonl and "
             f"eval_*_{step:06d}.json")

    # Steps dispatched whose finite flag the host has not read yet. Reading the previous
    # step's flag while the current one runs keeps one step in flight (no stall per step);
    # every flag is read before anything looks at, saves or evaluates the state.
    unchecked: list[tuple[int, dict]] = []

    def verify(keep_newest: bool = False) -> None:
        while len(unchecked) > (1 if keep_newest else 0):
            step, metrics = unchecked.pop(0)
            if not bool(metrics["finite"]):
                raise _diverged(_what_diverged(step, jax.device_get(metrics)), step, start,
                                config, checkpointer)

    def save(step: int, force: bool = False) -> None:
        try:
            checkpointer.maybe_save(step, state, force=force)
        except ckpt_lib.NonFiniteStateError as e:
            raise _diverged(str(e), step, start, config, checkpointer) from None

    stopped_by = ""
    try:
        with ckpt_lib.PreemptionWatcher() as preemption:
            for step, batch in method.train_batches.iterate(start, total):
                if step >= total:
                    break
                state, metrics = step_fn(state, method.frozen, _to_global(batch, mesh))
                done = step + 1
                unchecked.append((done, metrics))
                verify(keep_newest=True)
                log_now = done % log_every == 0 or done == total
                evals = method.evals_due(done) if done != total else []
                stop = (ckpt_lib.process_allgather_flag(preemption.requested)
                        or checkpointer.reached_preemption(done))
                if log_now or evals or stop or checkpointer.due(done):
                    verify()
                if log_now:
                    logged = dict(jax.device_get(metrics))
                    bad = getattr(method.train_batches, "num_bad_images", None)
                    if bad is not None:  # this host's unreadable images replaced so far
                        logged["data/bad_images"] = bad
                    scalars = writer.write(done, logged)
                    _log(progress.line(done, scalars))
                save(done)
                if evals:
                    run_eval(done, evals)
                if stop:
                    stopped_by = preemption.signal_name or "preemption"
                    break
        verify()
        done = int(state["step"])
        save(done, force=True)
        checkpointer.wait()
        if stopped_by == "SIGINT":  # every process stops; process 0 says so
            raise Interrupted(f"interrupted (SIGINT): saved step {done} to "
                              f"{checkpointer.directory}; run the same command again to resume"
                              if jax.process_index() == 0 else "")
        if stopped_by:
            _log(f"preempted: saved step {done} to {checkpointer.directory}; "
                 "run the same command again to resume")
        else:
            if done > 0:
                run_eval(done, list(method.eval_every))
            if jax.process_index() == 0:
                files.write_text(files.join(workdir, "done.json"), json.dumps({"step": done}))
    except BaseException:
        try:
            writer.close()
        except OSError:
            pass  # already failing (a full disk, say): that error is the one to report
        raise
    writer.close()
    return state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        build_method: Callable[[ml_collections.ConfigDict, Any], Method]) -> dict:
    """``mode=eval``: restores params (``train.init_from`` or the workdir's latest) and evaluates
    into ``workdir`` (holding its lock: not while a run trains there)."""
    workdir = files.normalize(workdir)
    workdir_lib.preflight(workdir, None)
    directory, step = ckpt_lib.find_checkpoint_dir(config.train.get("init_from", "") or workdir)
    mesh = sharding_lib.make_mesh(config.mesh)
    method = build_method(config, mesh)
    if method.evaluate is None:
        raise ValueError(f"method {config.method!r} has no evaluation")
    tx, _ = make_optimizer(config.optim, int(config.train.steps), config.data.batch_size)
    _, abstract_state, _ = build_state(method, tx, mesh, config.seed)
    with ckpt_lib.Checkpointer(directory, save_every=1, keep=1, async_save=False) as checkpointer:
        state = checkpointer.restore(abstract_state, step)
    step = int(state["step"])
    try:
        with workdir_lib.WorkdirLock(workdir, _log):
            writer = metrics_lib.MetricWriter(workdir, active=jax.process_index() == 0)
            try:
                scalars = writer.write(step, {f"eval/{k}": v for k, v in method.evaluate(
                    state["params"], method.frozen, step, workdir).items()})
            finally:
                writer.close()
    except OSError as e:
        error = _workdir_os_error(e, workdir)
        if error is e:
            raise
        raise error from e
    _log(f"eval of {directory} step {step}: {len(scalars)} numbers in metrics.jsonl and "
         f"eval_*_{step:06d}.json")
    return scalars
