"""Greedy and beam-search decoding, the whole loop inside one jit: for any decoder-only model
(``greedy_search`` / ``beam_search`` below), and for T5 (``t5.greedy_generate`` / ``beam_search``),
whose generators run the same ``greedy_loop`` / ``beam_loop`` (and so the same ``beam_step``) on
its decoder step.

The model contract (OPT in models/opt.py and Llama in models/llama.py follow it):

  apply_fn(params, input_ids=None, *, inputs_embeds=None, attention_mask, positions, cache,
           cache_index, logits_to_keep) -> {'logits': [B, n, V] float32, 'cache': new cache, ...}
      ``module.apply`` with ``params = {'params': ...}``. ``logits_to_keep`` (a Python int) is 1
      for the prompt's prefill: only the last position's logits are needed there (n = 1), and
      projecting every prompt position onto the vocabulary was ~31% of the prefill's FLOPs
      (opt-125m, 40-token prompts; bench/RESULTS.md); decode steps pass 0 (= all, L = 1).
      ``attention_mask`` is [B, T] over the cache slots (1 = real token), ``positions`` [B, L] int32 are explicit, ``cache_index`` is
      the scalar int32 slot of this call's first token. The model writes this call's keys/values
      at slots [cache_index, cache_index + L) and lets query slot i see key slot j only when
      j <= i and the mask at j is 1 (so slots not yet written need no masking here).
  init_cache_fn(batch, max_len) -> cache
      a pytree whose every leaf has the batch on axis 0 (beam search gathers beams along it),
      e.g. ``functools.partial(opt.init_cache, config, dtype=dtype)``.
  embed_fn(params, ids [B, L]) -> [B, L, D]
      the input-embedding lookup (``opt.embed_tokens``); needed only with ``prefix_embeds``.

Callables are static arguments of the jit: build them once (not a fresh ``partial`` per call)
or every call recompiles.

Layout of one row in the cache: [prefix_embeds (P, all real unless prefix_mask)] [prompt,
left-padded (L)]
[generated tokens (max_new_tokens)]. Positions are cumsum(mask) - 1, so padding between the
prefix and the prompt changes nothing (as in transformers, where the same mask gives the same
positions). The decode loop is a ``lax.while_loop`` that stops as soon as every row is done; no
host round trip per token. Outputs are [B, max_new_tokens] and hold ``pad_token_id`` after a
row's EOS and after an early stop.

On a mesh: pass ``mesh=`` (and params placed on it, e.g. ``opt.load(..., mesh=mesh)``); every
cache leaf is then pinned to ``layers.kv_cache_sharding`` (batch over ('data', 'fsdp'), heads over
'tensor') after the prefill and after every step (and beam reorder), so the loop carries the cache
in that layout. An ``init_cache_fn`` with the mesh bound (``opt.cache_fn(cfg, mesh=mesh)``) creates
it sharded in the first place.

Semantics follow transformers' ``generate`` (greedy: ``do_sample=False``; beam search: its
vectorised beam search with ``length_penalty`` and ``early_stopping`` in {False, True, 'never'},
returning the best finished hypothesis) so outputs match token for token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lqae_vlap.models.layers import constrain_kv_cache

STOP_MODES = {False: 0, True: 1, "never": 2}  # transformers' early_stopping values
_NEG = -1.0e9  # transformers' "impossible" score; kept equal so ties resolve the same way
# step_fn(context, tokens [R], t, cache) -> (logits [R, V] float32, cache): feeds the token
# generated at step t - 1 (t >= 1) to the model; ``context`` holds the per-row inputs the model
# needs besides the cache (beam search copies it, as the cache, to R = batch * num_beams rows).
StepFn = Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def eos_array(eos_token_id: int | Sequence[int] | None) -> jax.Array:
    """EOS ids as a traced [n_eos] int32 array: a new id does not recompile, a new count does."""
    if eos_token_id is None:
        return jnp.zeros((0,), jnp.int32)
    return jnp.atleast_1d(jnp.asarray(eos_token_id, jnp.int32))


def _is_eos(tokens: jax.Array, eos: jax.Array) -> jax.Array:
    return jnp.any(tokens[..., None] == eos, axis=-1)


def _check_inputs(input_ids: jax.Array, attention_mask: jax.Array, max_new_tokens: int,
                  prefix_embeds: jax.Array | None, embed_fn: Callable | None,
                  max_length: int | None, prefix_mask: jax.Array | None = None
                  ) -> tuple[int, int]:
    """Validates shapes; returns (prompt slots T = P + L, cache length)."""
    if input_ids.ndim != 2:
        raise ValueError(f"generate: input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"generate: attention_mask {attention_mask.shape} must match input_ids "
                         f"{input_ids.shape} (1 = real token, 0 = left padding)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    prefix = 0
    if prefix_embeds is not None:
        if embed_fn is None:
            raise ValueError("generate: prefix_embeds needs embed_fn (e.g. opt.embed_tokens) to embed "
                             "the prompt after the prefix")
        if prefix_embeds.ndim != 3 or prefix_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"generate: prefix_embeds must be [batch={input_ids.shape[0]}, prefix, "
                             f"dim], got shape {prefix_embeds.shape}")
        prefix = prefix_embeds.shape[1]
    if prefix_mask is not None and (prefix_embeds is None
                                    or prefix_mask.shape != prefix_embeds.shape[:2]):
        raise ValueError(f"generate: prefix_mask {prefix_mask.shape} must be [batch, prefix] of "
                         "prefix_embeds (1 = real slot)")
    prompt = prefix + input_ids.shape[1]
    need = prompt + max_new_tokens
    if max_length is not None and max_length < need:
        raise ValueError(f"generate: max_length={max_length} cannot hold the prompt ({prompt} slots "
                         f"incl. prefix) plus max_new_tokens={max_new_tokens}; pass >= {need} or None")
    return prompt, (need if max_length is None else max_length)


def _prefill(apply_fn: Callable, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
             prefix_embeds: jax.Array | None, embed_fn: Callable | None, init_cache_fn: Callable,
             cache_len: int, mesh: Mesh | None, prefix_mask: jax.Array | None = None
             ) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
    """Runs the prompt through the model once.

    Returns (last-slot logits [B, V] float32, cache, cache mask [B, cache_len], next position [B]).
    """
    batch, _ = input_ids.shape
    prompt_mask = attention_mask.astype(jnp.int32)
    if prefix_embeds is not None:
        pm = (jnp.ones(prefix_embeds.shape[:2], jnp.int32) if prefix_mask is None
              else prefix_mask.astype(jnp.int32))
        prompt_mask = jnp.concatenate([pm, prompt_mask], axis=1)
    prompt = prompt_mask.shape[1]
    # Decode slots are real from the start; causality hides the ones not yet written.
    mask = jnp.concatenate([prompt_mask, jnp.ones((batch, cache_len - prompt), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    cache = constrain_kv_cache(init_cache_fn(batch, cache_len), mesh)
    kw = dict(attention_mask=mask, positions=positions, cache=cache, cache_index=jnp.int32(0),
              logits_to_keep=1)
    if prefix_embeds is None:
        out = apply_fn(params, input_ids=input_ids, **kw)
    else:
        text = embed_fn(params, input_ids)
        embeds = jnp.concatenate([prefix_embeds.astype(text.dtype), text], axis=1)
        out = apply_fn(params, inputs_embeds=embeds, **kw)
    # Left padding puts every row's last real token in the last slot (the one logit kept).
    return (out["logits"][:, -1].astype(jnp.float32), constrain_kv_cache(out["cache"], mesh), mask,
            prompt_mask.sum(axis=1))


def _decoder_step(apply_fn: Callable, params: Any, prompt: int) -> StepFn:
    """The decoder-only ``StepFn``: context (cache mask [R, T], next position [R]); token t - 1
    goes into slot prompt + t - 1 at position next_pos + t - 1."""
    def step(context, tokens, t, cache):
        mask, next_pos = context
        out = apply_fn(params, input_ids=tokens[:, None], attention_mask=mask,
                       positions=(next_pos + t - 1)[:, None].astype(jnp.int32), cache=cache,
                       cache_index=jnp.asarray(prompt + t - 1, jnp.int32), logits_to_keep=0)
        return out["logits"][:, -1].astype(jnp.float32), out["cache"]
    return step


def greedy_loop(step_fn: StepFn, context: Any, logits: jax.Array, cache: Any, eos: jax.Array, *,
                max_new_tokens: int, pad_token_id: int,
                mesh: Mesh | None) -> tuple[jax.Array, jax.Array]:
    """Greedy decoding after the model's first step, in one ``lax.while_loop``.

    Args:
      step_fn, context: the model step (``StepFn``) and its per-row inputs.
      logits: [B, V] float32 of the first new token; cache: the cache after that step.
      eos: [n_eos] int32 ids that end a row (``eos_array``); the loop stops once every row has.

    Returns:
      (tokens [B, max_new_tokens] int32, pad after a row's EOS and after the last step run;
      steps run, a scalar int32).
    """
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jnp.full((first.shape[0], max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)

    def cond(state):
        t, _, done, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, out, done, cache = state
        logits, cache = step_fn(context, out[:, t - 1], t, cache)
        token = jnp.where(done, pad_token_id, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, t))
        return t + 1, out, done | _is_eos(token, eos), constrain_kv_cache(cache, mesh)

    t, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, _is_eos(first, eos), cache))
    return out, t


@functools.partial(jax.jit, static_argnames=(
    "apply_fn", "max_new_tokens", "pad_token_id", "embed_fn", "init_cache_fn", "max_length",
    "mesh"))
def _greedy(apply_fn, params, input_ids, attention_mask, prefix_embeds, prefix_mask, eos, *,
            max_new_tokens, pad_token_id, embed_fn, init_cache_fn, max_length, mesh):
    prompt, cache_len = _check_inputs(input_ids, attention_mask, max_new_tokens, prefix_embeds,
                                      embed_fn, max_length, prefix_mask)
    logits, cache, mask, next_pos = _prefill(apply_fn, params, input_ids, attention_mask,
                                             prefix_embeds, embed_fn, init_cache_fn, cache_len, mesh,
                                             prefix_mask)
    return greedy_loop(_decoder_step(apply_fn, params, prompt), (mask, next_pos), logits, cache,
                       eos, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                       mesh=mesh)[0]


def greedy_search(apply_fn: Callable, params: Any, *, input_ids: jax.Array,
                  attention_mask: jax.Array, max_new_tokens: int,
                  eos_token_id: int | Sequence[int] | None, pad_token_id: int,
                  prefix_embeds: jax.Array | None = None, embed_fn: Callable | None = None,
                  init_cache_fn: Callable[[int, int], Any], max_length: int | None = None,
                  mesh: Mesh | None = None, prefix_mask: jax.Array | None = None) -> jax.Array:
    """Greedy decoding (transformers ``generate(do_sample=False)``), one jit for the whole loop.

    Args:
      apply_fn, params, init_cache_fn, embed_fn: see the module docstring.
      input_ids: [B, L] int32 prompts, LEFT-padded. attention_mask: [B, L], 1 = real token.
      max_new_tokens: tokens to generate per row.
      eos_token_id: an id or ids that end a row (None: rows never end early).
      pad_token_id: emitted after a row's EOS.
      prefix_embeds: [B, P, D] embeddings placed before the prompt's token embeddings (VLAP's
        visual tokens), all treated as real unless ``prefix_mask`` is given.
      prefix_mask: [B, P], 1 = real prefix slot, 0 = padding (e.g. rows of an interleaved
        [image ; text ; image ; ...] sequence of different lengths, left-padded as a whole with
        empty input_ids [B, 0]); positions skip the padding as they skip the prompt's.
      max_length: cache slots (default P + L + max_new_tokens); must be at least that.
      mesh: keep every cache leaf sharded on this mesh through the loop (batch over ('data',
        'fsdp'), heads over 'tensor': ``layers.kv_cache_sharding``); pass params placed on the
        same mesh (e.g. ``opt.load(..., mesh=mesh)``) and, to create the cache sharded rather
        than reshard it, an ``init_cache_fn`` with the mesh bound (``opt.cache_fn(cfg, mesh=mesh)``).

    Returns:
      [B, max_new_tokens] int32 generated tokens (the prompt is not repeated).
    """
    return _greedy(apply_fn, params, input_ids, attention_mask, prefix_embeds, prefix_mask,
                   eos_array(eos_token_id), max_new_tokens=int(max_new_tokens),
                   pad_token_id=int(pad_token_id), embed_fn=embed_fn, init_cache_fn=init_cache_fn,
                   max_length=max_length, mesh=mesh)


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x: [B, K, ...], idx: [B, J] -> [B, J, ...]: per-batch selection of beams/candidates."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def check_beam_args(num_beams: int, early_stopping: bool | str) -> None:
    """Raises a ValueError for num_beams < 1 or an early_stopping outside {False, True, 'never'}."""
    if num_beams < 1:
        raise ValueError(f"beam_search: num_beams must be >= 1, got {num_beams}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"beam_search: early_stopping must be False, True or 'never', got "
                         f"{early_stopping!r}")


def beam_step(t: int | jax.Array, logits: jax.Array, state: dict[str, jax.Array],
              eos: jax.Array, length_penalty: jax.Array,
              stop_mode: jax.Array) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """One step of transformers' vectorised beam search, choosing generated token t (0-based).

    Args:
      logits: [B*K, V] float32 of the K running beams of each row (beam-major within a row).
      state: the search, N = max_new_tokens: running [B, K, N] tokens and running_scores
        [B, K] (sum of log-probs); the finished pool seqs [B, K, N], scores [B, K]
        (sum(log p) / length ** length_penalty), finished [B, K]; improvable [B, 1].
      eos: [n_eos] int32 ids. length_penalty: scalar float32. stop_mode:
        STOP_MODES[early_stopping], scalar int32.

    Returns:
      (the new state, origin [B, K]: the old beam each new running beam extends, go_on: whether
      any row can still improve).
    """
    batch, k, n = state["running"].shape
    keep = max(2, 1 + eos.shape[0]) * k  # candidates per step, enough to leave k unfinished
    stop_when_full = stop_mode == STOP_MODES[True]
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, vocab)
    flat = (log_probs + state["running_scores"][:, :, None]).reshape(batch, k * vocab)
    top_lp, top_idx = jax.lax.top_k(flat, keep)  # [B, keep], sorted
    beam, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = _gather(state["running"], beam).at[:, :, t].set(token)  # [B, keep, N]
    hits = _is_eos(token, eos) | (t + 1 >= n)

    # Running beams: the best k candidates that did not just stop.
    run_lp = top_lp + hits.astype(jnp.float32) * _NEG
    _, nxt = jax.lax.top_k(run_lp, k)
    running, running_scores = _gather(top_seqs, nxt), _gather(run_lp, nxt)
    origin = _gather(beam, nxt)

    # Finished pool: merge the candidates among the top k that just stopped.
    just_done = hits & (jnp.arange(keep) < k)[None]
    fin_lp = top_lp / (jnp.asarray(t + 1, jnp.float32) ** length_penalty)
    full = jnp.all(state["finished"], axis=-1, keepdims=True) & stop_when_full
    fin_lp = fin_lp + full * _NEG + (~state["improvable"]) * _NEG + (~just_done) * _NEG
    merged_scores = jnp.concatenate([state["scores"], fin_lp], axis=1)
    _, best = jax.lax.top_k(merged_scores, k)
    seqs = _gather(jnp.concatenate([state["seqs"], top_seqs], axis=1), best)
    scores = _gather(merged_scores, best)
    finished = _gather(jnp.concatenate([state["finished"], just_done], axis=1), best)

    # Early-stop heuristic (transformers' _check_early_stop_heuristic), at length t + 1.
    # 'never' with a positive penalty (which favours length) assumes the longest length.
    longest = (stop_mode == STOP_MODES["never"]) & (length_penalty > 0.0)
    best_len = jnp.where(longest, jnp.float32(n), jnp.asarray(t + 1, jnp.float32))
    best_running = running_scores[:, :1] / (best_len ** length_penalty)
    worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
    improvable = state["improvable"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
    go_on = jnp.any(improvable) & ~(jnp.all(finished) & stop_when_full) & ~jnp.all(hits)
    return dict(running=running, running_scores=running_scores, seqs=seqs, scores=scores,
                finished=finished, improvable=improvable), origin, go_on


def beam_loop(step_fn: StepFn, context: Any, logits: jax.Array, cache: Any, eos: jax.Array,
              length_penalty: jax.Array, stop_mode: jax.Array, *, num_beams: int,
              max_new_tokens: int, pad_token_id: int, mesh: Mesh | None) -> dict[str, jax.Array]:
    """Beam search after the model's first step: every row is copied to num_beams beams (its
    logits [B, V], ``context`` and cache, as ``greedy_loop`` takes them), then ``beam_step`` runs
    in one ``lax.while_loop``; eos, length_penalty and stop_mode as ``beam_step`` takes them.

    Returns:
      dict(sequences=[B, K, max_new_tokens] int32 finished hypotheses, best first, pad after
      each EOS; scores=[B, K] their length-normalised scores; num_steps=scalar int32 steps run).
    """
    batch, k, n = logits.shape[0], num_beams, max_new_tokens
    # Rows b -> b*k .. b*k+k-1, the beam-major order beam_step and reorder expect.
    context, cache = constrain_kv_cache(
        jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), (context, cache)), mesh)
    init = dict(
        running=jnp.full((batch, k, n), pad_token_id, jnp.int32),
        running_scores=jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(_NEG),  # beam 0 only
        seqs=jnp.full((batch, k, n), pad_token_id, jnp.int32),
        scores=jnp.full((batch, k), _NEG, jnp.float32),
        finished=jnp.zeros((batch, k), bool),
        improvable=jnp.ones((batch, 1), bool),
    )

    def reorder(cache, origin):
        rows = (jnp.arange(batch)[:, None] * k + origin).reshape(-1)
        return constrain_kv_cache(jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache), mesh)

    def body(state):
        t, s, cache, _ = state
        logits, cache = step_fn(context, s["running"][:, :, t - 1].reshape(-1), t, cache)
        s, origin, go_on = beam_step(t, logits, s, eos, length_penalty, stop_mode)
        return t + 1, s, reorder(cache, origin), go_on

    s, origin, go_on = beam_step(0, jnp.repeat(logits, k, axis=0), init, eos, length_penalty,
                                 stop_mode)
    t, s, _, _ = jax.lax.while_loop(lambda state: state[3], body,
                                    (jnp.int32(1), s, reorder(cache, origin), go_on))
    return {"sequences": s["seqs"], "scores": s["scores"], "num_steps": t}


@functools.partial(jax.jit, static_argnames=(
    "apply_fn", "max_new_tokens", "pad_token_id", "embed_fn", "init_cache_fn", "max_length",
    "num_beams", "mesh"))
def _beam(apply_fn, params, input_ids, attention_mask, prefix_embeds, prefix_mask, eos,
          length_penalty, stop_mode, *, max_new_tokens, pad_token_id, embed_fn, init_cache_fn,
          max_length, num_beams, mesh):
    # eos, length_penalty and stop_mode (STOP_MODES[early_stopping]) are traced: changing them
    # does not recompile.
    prompt, cache_len = _check_inputs(input_ids, attention_mask, max_new_tokens, prefix_embeds,
                                      embed_fn, max_length, prefix_mask)
    # The prompt is identical for every beam: prefill once, beam_loop copies the rows.
    logits, cache, mask, next_pos = _prefill(apply_fn, params, input_ids, attention_mask,
                                             prefix_embeds, embed_fn, init_cache_fn, cache_len, mesh,
                                             prefix_mask)
    out = beam_loop(_decoder_step(apply_fn, params, prompt), (mask, next_pos), logits, cache, eos,
                    length_penalty, stop_mode, num_beams=num_beams, max_new_tokens=max_new_tokens,
                    pad_token_id=pad_token_id, mesh=mesh)
    return out["sequences"][:, 0]


def beam_search(apply_fn: Callable, params: Any, *, input_ids: jax.Array,
                attention_mask: jax.Array, max_new_tokens: int,
                eos_token_id: int | Sequence[int] | None, pad_token_id: int, num_beams: int,
                length_penalty: float = 1.0, early_stopping: bool | str = False,
                prefix_embeds: jax.Array | None = None, embed_fn: Callable | None = None,
                init_cache_fn: Callable[[int, int], Any], max_length: int | None = None,
                mesh: Mesh | None = None, prefix_mask: jax.Array | None = None) -> jax.Array:
    """Beam search as transformers' ``generate(num_beams=K, do_sample=False)``, one jit.

    Arguments as ``greedy_search``, plus:
      num_beams: beams per row.
      length_penalty: a finished hypothesis scores sum(log p) / generated_length ** length_penalty.
      early_stopping: transformers' semantics: False (stop when the best running beam, at its
        current length, cannot beat the worst of K finished ones), True (stop once K are
        finished), 'never' (the heuristic at max length when length_penalty > 0).

    Returns:
      [B, max_new_tokens] int32: the best finished hypothesis per row, pad after its EOS.
    """
    check_beam_args(num_beams, early_stopping)
    return _beam(apply_fn, params, input_ids, attention_mask, prefix_embeds, prefix_mask,
                 eos_array(eos_token_id), jnp.float32(length_penalty),
                 jnp.int32(STOP_MODES[early_stopping]), max_new_tokens=int(max_new_tokens),
                 pad_token_id=int(pad_token_id), embed_fn=embed_fn, init_cache_fn=init_cache_fn,
                 max_length=max_length, num_beams=int(num_beams), mesh=mesh)
