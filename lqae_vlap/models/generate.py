"""Greedy and beam-search decoding for any decoder-only model, the whole loop inside one jit.

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

Layout of one row in the cache: [prefix_embeds (P, all real)] [prompt, left-padded (L)]
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

_STOP_MODES = {False: 0, True: 1, "never": 2}  # transformers' early_stopping values
_NEG = -1.0e9  # transformers' "impossible" score; kept equal so ties resolve the same way


def _eos_array(eos_token_id: int | Sequence[int] | None) -> jax.Array:
    """EOS ids as a traced [n_eos] int32 array: a new id does not recompile, a new count does."""
    if eos_token_id is None:
        return jnp.zeros((0,), jnp.int32)
    return jnp.atleast_1d(jnp.asarray(eos_token_id, jnp.int32))


def _is_eos(tokens: jax.Array, eos: jax.Array) -> jax.Array:
    return jnp.any(tokens[..., None] == eos, axis=-1)


def _check_inputs(input_ids: jax.Array, attention_mask: jax.Array, max_new_tokens: int,
                  prefix_embeds: jax.Array | None, embed_fn: Callable | None,
                  max_length: int | None) -> tuple[int, int]:
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
    prompt = prefix + input_ids.shape[1]
    need = prompt + max_new_tokens
    if max_length is not None and max_length < need:
        raise ValueError(f"generate: max_length={max_length} cannot hold the prompt ({prompt} slots "
                         f"incl. prefix) plus max_new_tokens={max_new_tokens}; pass >= {need} or None")
    return prompt, (need if max_length is None else max_length)


def _prefill(apply_fn: Callable, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
             prefix_embeds: jax.Array | None, embed_fn: Callable | None, init_cache_fn: Callable,
             cache_len: int, mesh: Mesh | None) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
    """Runs the prompt through the model once.

    Returns (last-slot logits [B, V] float32, cache, cache mask [B, cache_len], next position [B]).
    """
    batch, _ = input_ids.shape
    prompt_mask = attention_mask.astype(jnp.int32)
    if prefix_embeds is not None:
        prompt_mask = jnp.concatenate(
            [jnp.ones(prefix_embeds.shape[:2], jnp.int32), prompt_mask], axis=1)
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


def _step(apply_fn: Callable, params: Any, tokens: jax.Array, cache: Any, mask: jax.Array,
          slot: jax.Array, positions: jax.Array) -> tuple[jax.Array, Any]:
    """Feeds one token per row at cache slot ``slot``: tokens [B] -> (logits [B, V], cache)."""
    out = apply_fn(params, input_ids=tokens[:, None], attention_mask=mask,
                   positions=positions[:, None].astype(jnp.int32), cache=cache,
                   cache_index=slot.astype(jnp.int32), logits_to_keep=0)
    return out["logits"][:, -1].astype(jnp.float32), out["cache"]


@functools.partial(jax.jit, static_argnames=(
    "apply_fn", "max_new_tokens", "pad_token_id", "embed_fn", "init_cache_fn", "max_length",
    "mesh"))
def _greedy(apply_fn, params, input_ids, attention_mask, prefix_embeds, eos, *, max_new_tokens,
            pad_token_id, embed_fn, init_cache_fn, max_length, mesh):
    prompt, cache_len = _check_inputs(input_ids, attention_mask, max_new_tokens, prefix_embeds,
                                      embed_fn, max_length)
    batch = input_ids.shape[0]
    logits, cache, mask, next_pos = _prefill(apply_fn, params, input_ids, attention_mask,
                                             prefix_embeds, embed_fn, init_cache_fn, cache_len, mesh)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)
    state = (jnp.int32(1), out, _is_eos(first, eos), cache)

    def cond(state):
        i, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, out, done, cache = state
        # Token i-1 goes into slot prompt + i - 1 at position next_pos + i - 1.
        logits, cache = _step(apply_fn, params, out[:, i - 1], cache, mask, prompt + i - 1,
                              next_pos + i - 1)
        token = jnp.where(done, pad_token_id, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        return i + 1, out, done | _is_eos(token, eos), constrain_kv_cache(cache, mesh)

    return jax.lax.while_loop(cond, body, state)[1]


def greedy_search(apply_fn: Callable, params: Any, *, input_ids: jax.Array,
                  attention_mask: jax.Array, max_new_tokens: int,
                  eos_token_id: int | Sequence[int] | None, pad_token_id: int,
                  prefix_embeds: jax.Array | None = None, embed_fn: Callable | None = None,
                  init_cache_fn: Callable[[int, int], Any], max_length: int | None = None,
                  mesh: Mesh | None = None) -> jax.Array:
    """Greedy decoding (transformers ``generate(do_sample=False)``), one jit for the whole loop.

    Args:
      apply_fn, params, init_cache_fn, embed_fn: see the module docstring.
      input_ids: [B, L] int32 prompts, LEFT-padded. attention_mask: [B, L], 1 = real token.
      max_new_tokens: tokens to generate per row.
      eos_token_id: an id or ids that end a row (None: rows never end early).
      pad_token_id: emitted after a row's EOS.
      prefix_embeds: [B, P, D] embeddings placed before the prompt's token embeddings (VLAP's
        visual tokens), all treated as real.
      max_length: cache slots (default P + L + max_new_tokens); must be at least that.
      mesh: keep every cache leaf sharded on this mesh through the loop (batch over ('data',
        'fsdp'), heads over 'tensor': ``layers.kv_cache_sharding``); pass params placed on the
        same mesh (e.g. ``opt.load(..., mesh=mesh)``) and, to create the cache sharded rather
        than reshard it, an ``init_cache_fn`` with the mesh bound (``opt.cache_fn(cfg, mesh=mesh)``).

    Returns:
      [B, max_new_tokens] int32 generated tokens (the prompt is not repeated).
    """
    return _greedy(apply_fn, params, input_ids, attention_mask, prefix_embeds,
                   _eos_array(eos_token_id), max_new_tokens=int(max_new_tokens),
                   pad_token_id=int(pad_token_id), embed_fn=embed_fn, init_cache_fn=init_cache_fn,
                   max_length=max_length, mesh=mesh)


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x: [B, K, ...], idx: [B, J] -> [B, J, ...]: per-batch selection of beams/candidates."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=(
    "apply_fn", "max_new_tokens", "pad_token_id", "embed_fn", "init_cache_fn", "max_length",
    "num_beams", "mesh"))
def _beam(apply_fn, params, input_ids, attention_mask, prefix_embeds, eos, length_penalty, stop_mode,
          *, max_new_tokens, pad_token_id, embed_fn, init_cache_fn, max_length, num_beams, mesh):
    # eos, length_penalty and stop_mode (_STOP_MODES[early_stopping]) are traced: changing them
    # does not recompile.
    stop_when_full = stop_mode == _STOP_MODES[True]
    prompt, cache_len = _check_inputs(input_ids, attention_mask, max_new_tokens, prefix_embeds,
                                      embed_fn, max_length)
    batch, k, n = input_ids.shape[0], num_beams, max_new_tokens
    keep = max(2, 1 + eos.shape[0]) * k  # candidates per step, enough to leave k unfinished
    top_k_mask = jnp.arange(keep) < k
    logits, cache, mask, next_pos = _prefill(apply_fn, params, input_ids, attention_mask,
                                             prefix_embeds, embed_fn, init_cache_fn, cache_len, mesh)
    # The prompt is identical for every beam: prefill once, then copy rows b -> b*k .. b*k+k-1.
    logits = jnp.repeat(logits, k, axis=0)
    cache = constrain_kv_cache(jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache), mesh)
    mask, next_pos = jnp.repeat(mask, k, axis=0), jnp.repeat(next_pos, k, axis=0)

    def select(t, logits, s):
        """One beam step on logits [B*K, V] for generated-length t (0-based), as transformers."""
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, vocab)
        flat = (log_probs + s["running_scores"][:, :, None]).reshape(batch, k * vocab)
        top_lp, top_idx = jax.lax.top_k(flat, keep)  # [B, keep], sorted
        beam, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seqs = _gather(s["running"], beam).at[:, :, t].set(token)  # [B, keep, N]
        hits = _is_eos(token, eos) | (t + 1 >= n)

        # Running beams: the best k candidates that did not just stop.
        run_lp = top_lp + hits.astype(jnp.float32) * _NEG
        _, nxt = jax.lax.top_k(run_lp, k)
        running, running_scores = _gather(top_seqs, nxt), _gather(run_lp, nxt)
        origin = _gather(beam, nxt)  # [B, K] parent beam of each new running beam

        # Finished pool: merge the candidates among the top k that just stopped.
        just_done = hits & top_k_mask[None]
        fin_lp = top_lp / (jnp.asarray(t + 1, jnp.float32) ** length_penalty)
        full = jnp.all(s["finished"], axis=-1, keepdims=True) & stop_when_full
        fin_lp = fin_lp + full * _NEG + (~s["improvable"]) * _NEG + (~just_done) * _NEG
        merged_scores = jnp.concatenate([s["scores"], fin_lp], axis=1)
        _, best = jax.lax.top_k(merged_scores, k)
        seqs = _gather(jnp.concatenate([s["seqs"], top_seqs], axis=1), best)
        scores = _gather(merged_scores, best)
        finished = _gather(jnp.concatenate([s["finished"], just_done], axis=1), best)

        # Early-stop heuristic (transformers' _check_early_stop_heuristic), at length t + 1.
        # 'never' with a positive penalty (which favours length) assumes the longest length.
        longest = (stop_mode == _STOP_MODES["never"]) & (length_penalty > 0.0)
        best_len = jnp.where(longest, jnp.float32(n), jnp.asarray(t + 1, jnp.float32))
        best_running = running_scores[:, :1] / (best_len ** length_penalty)
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
        improvable = s["improvable"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
        go_on = (jnp.any(improvable) & ~(jnp.all(finished) & stop_when_full)
                 & ~jnp.all(hits))
        return dict(running=running, running_scores=running_scores, seqs=seqs, scores=scores,
                    finished=finished, improvable=improvable), origin, go_on

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

    s, origin, go_on = select(0, logits, init)
    state = (jnp.int32(1), s, reorder(cache, origin), go_on)

    def cond(state):
        return state[3]

    def body(state):
        t, s, cache, _ = state
        tokens = s["running"][:, :, t - 1].reshape(-1)
        logits, cache = _step(apply_fn, params, tokens, cache, mask, prompt + t - 1, next_pos + t - 1)
        s, origin, go_on = select(t, logits, s)
        return t + 1, s, reorder(cache, origin), go_on

    s = jax.lax.while_loop(cond, body, state)[1]
    return s["seqs"][:, 0]


def beam_search(apply_fn: Callable, params: Any, *, input_ids: jax.Array,
                attention_mask: jax.Array, max_new_tokens: int,
                eos_token_id: int | Sequence[int] | None, pad_token_id: int, num_beams: int,
                length_penalty: float = 1.0, early_stopping: bool | str = False,
                prefix_embeds: jax.Array | None = None, embed_fn: Callable | None = None,
                init_cache_fn: Callable[[int, int], Any], max_length: int | None = None,
                mesh: Mesh | None = None) -> jax.Array:
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
    if num_beams < 1:
        raise ValueError(f"beam_search: num_beams must be >= 1, got {num_beams}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"beam_search: early_stopping must be False, True or 'never', got "
                         f"{early_stopping!r}")
    return _beam(apply_fn, params, input_ids, attention_mask, prefix_embeds,
                 _eos_array(eos_token_id), jnp.float32(length_penalty),
                 jnp.int32(_STOP_MODES[early_stopping]), max_new_tokens=int(max_new_tokens),
                 pad_token_id=int(pad_token_id), embed_fn=embed_fn, init_cache_fn=init_cache_fn,
                 max_length=max_length, num_beams=int(num_beams), mesh=mesh)
