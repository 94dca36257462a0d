"""One interface over VLAP's frozen LLM, so the method and its evaluations never branch on family.

``load_llm(config.model, mesh)`` loads the checkpoint through ``models.load_pretrained`` (any
family, HF folder or GGUF file, real or abstract for plan mode) and its tokenizer, and
``make_llm(family, module, tokenizer)`` wraps the loaded Flax LLM:

  DecoderOnlyLLM ('opt', 'llama'): the LM reads [visual prefix ; prompt ; caption] left to right.
    text_hidden   = the LM's last hidden states on the caption alone.
    caption_loss  = next-token cross-entropy on the caption tokens of [prefix ; prompt ; caption].
    generate      = models/generate.py with the prefix, prompts LEFT-padded.
    generate_interleaved = the same on interleaved [prefix_1 ; text_1 ; ... ; prefix_q ; text]
                    rows (few-shot VQA), each row LEFT-padded as a whole (``embed_segments``).
  EncoderDecoderLLM ('t5'): the visual prefix is ENCODER input (VLAP's T5 setting).
    text_hidden   = the ENCODER's last hidden states on the caption alone.
    caption_loss  = decoder cross-entropy: encoder input [prefix ; prompt], decoder input
                    [decoder_start ; caption[:-1]], labels = caption (as transformers'
                    T5ForConditionalGeneration(labels=...)).
    generate      = models/t5.py's greedy / beam search with the prefix, prompts RIGHT-padded so
                    the relative positions between prefix and prompt are those of the unpadded row.
    generate_interleaved = the same with an interleaved encoder input, RIGHT-padded as a whole.

word_embeddings / text_hidden / caption_loss are pure functions of (llm_params, arrays): they run
under the caller's jit. generate / decode are host-level (numpy in, numpy / str out) and call
module-level jitted searches with static arguments built once here, so repeated calls with the
same shapes do not recompile; prompt lengths are rounded up to a multiple of 8 for the same reason.

Dtypes: the LLM computes in its own dtype (e.g. bfloat16 weights from the loader); logits come out
in float32 and every loss here is computed in float32.

Memory of caption_loss (``config.model``): ``llm_remat`` rematerialises each frozen layer in the
backward pass (layers.REMAT_POLICIES; generation and the text side never use it), and
``caption_loss_chunk`` > 0 scores the caption from hidden states with
ops/losses.chunked_cross_entropy, that many tokens at a time, at the caption positions only, so
no [batch, tokens, vocab] float32 logits are held; 0 takes the model's own logits at every
position (the unoptimised path the tests compare against).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lqae_vlap import models
from lqae_vlap.models import generate as gen
from lqae_vlap.models import layers
from lqae_vlap.models import t5
from lqae_vlap.ops import losses

FAMILIES = ("opt", "llama", "t5")
PROMPT_MULTIPLE = 8  # prompt lengths are padded up to a multiple of this: fewer recompiles


# ----------------------------------------------------------------------------------------------
# Pieces shared by the families


def caption_targets(num_before: int, caption_ids: jax.Array, caption_mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Shifted targets for the sequence [num_before prefix/prompt slots ; caption (L)].

    Position i predicts token i + 1, so caption token j is the target of position
    num_before + j - 1. Returns (targets [B, num_before + L] int32, mask [B, num_before + L]).
    """
    if num_before < 1:
        raise ValueError("caption_targets: need at least one slot before the caption (the visual "
                         "prefix) to predict its first token")
    b = caption_ids.shape[0]
    head = jnp.zeros((b, num_before - 1), jnp.int32)
    tail = jnp.zeros((b, 1), jnp.int32)
    targets = jnp.concatenate([head, caption_ids.astype(jnp.int32), tail], axis=1)
    mask = jnp.concatenate([head, caption_mask.astype(jnp.int32), tail], axis=1)
    return targets, mask


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int, *, left: bool,
                multiple: int = PROMPT_MULTIPLE) -> tuple[np.ndarray, np.ndarray]:
    """B token-id lists -> (ids [B, L] int32, mask [B, L] int32), L = the longest rounded up to
    ``multiple`` (at least ``multiple``); padding on the left (decoder-only) or the right (T5)."""
    longest = max((len(p) for p in prompts), default=0)
    length = max(1, math.ceil(longest / multiple)) * multiple
    ids = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        if n:
            sl = slice(length - n, length) if left else slice(0, n)
            ids[i, sl] = np.asarray(p, np.int32)
            mask[i, sl] = 1
    return ids, mask


@jax.jit
def _assemble(words: jax.Array, blocks: jax.Array, ids: jax.Array, index: jax.Array,
              is_token: jax.Array) -> jax.Array:
    """[B, L, D]: words[ids] where is_token, else blocks[index] (words [V, D], blocks [N, D])."""
    return jnp.where(is_token[..., None], jnp.take(words, ids, axis=0),
                     jnp.take(blocks, index, axis=0))


def _tree(llm_params: Any) -> Any:
    """The inner param tree, whether given as {'params': ...} or already inner, unboxed."""
    tree = llm_params["params"] if isinstance(llm_params, dict) and "params" in llm_params \
        else llm_params
    return nn.meta.unbox(tree)


# ----------------------------------------------------------------------------------------------
# The interface


class FrozenLLM:
    """A frozen LLM seen through VLAP's needs. Build with ``make_llm``.

    Attributes:
      family: 'opt' | 'llama' | 't5'.
      module: the Flax LLM (``module.apply({'params': llm_params}, ...)``).
      tokenizer: the Hugging Face tokenizer, or None (plan mode; ``decode`` then fails).
      eos_token_id, pad_token_id: the tokenizer's (captions are tokenised with them), else the
        model config's.
    """

    family: str = ""
    left_pad = True

    def __init__(self, module: nn.Module, tokenizer: Any, *, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, mesh: Any = None, remat: str = "none",
                 loss_chunk: int = 0) -> None:
        self.module = module
        # caption_loss alone runs the layers checkpointed: generation and text_hidden are never
        # differentiated, and a checkpoint's barriers would only get in their way.
        if remat == "auto":
            raise ValueError("config.model.llm_remat='auto' is for plan mode, which tries each "
                             f"policy; set the one it picks (one of {layers.REMAT_POLICIES})")
        layers.check_remat(remat, "config.model.llm_remat")
        self._loss_module = module if remat == "none" else module.clone(remat=remat)
        if int(loss_chunk) < 0:
            raise ValueError(f"config.model.caption_loss_chunk={loss_chunk} must be >= 0 (0 = "
                             "full logits, n = the caption scored n tokens at a time)")
        self.loss_chunk = int(loss_chunk)
        self.tokenizer = tokenizer
        self.mesh = mesh  # generation keeps its KV cache sharded on it (models/layers.py)
        cfg = module.config
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        eos = eos if eos is not None else cfg.eos_token_id
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(cfg, "pad_token_id", None)
        if eos is None:
            raise ValueError(f"{self.family}: neither the tokenizer nor the model config names an "
                             "EOS token; pass eos_token_id= to make_llm")
        self.eos_token_id = int(eos)
        self.pad_token_id = int(pad if pad is not None else eos)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(family={self.family!r}, width={self.embed_dim}, "
                f"dtype={jnp.dtype(self.module.dtype).name}, eos={self.eos_token_id}, "
                f"pad={self.pad_token_id})")

    @property
    def embed_dim(self) -> int:
        """D: the width of the input word embeddings (= of the visual prefix)."""
        raise NotImplementedError

    # --- jittable ---

    def word_embeddings(self, llm_params: Any) -> jax.Array:
        """[V, D] the input word-embedding matrix (the LLM's dtype)."""
        raise NotImplementedError

    def text_hidden(self, llm_params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """ids, mask: [B, L] right-padded caption -> [B, L, D] last hidden states on it alone."""
        raise NotImplementedError

    def text_repr(self, llm_params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """VLAP's text representation: ``text_hidden`` mean-pooled over real tokens, [B, D]
        float32 (the training loss and the retrieval evaluation both use this)."""
        return losses.masked_mean(self.text_hidden(llm_params, ids, mask), mask)

    def caption_loss(self, llm_params: Any, prefix: jax.Array, prompt_ids: jax.Array,
                     ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Scalar float32 mean cross-entropy over the caption tokens only.

        prefix: [B, T, D] projected visual tokens; prompt_ids: [P] int32 (one prompt for the
        batch); ids, mask: [B, L] right-padded caption (+EOS), 1 = real token.
        """
        raise NotImplementedError

    def _check_loss_args(self, prefix: jax.Array, prompt_ids: jax.Array, ids: jax.Array,
                         mask: jax.Array) -> None:
        if prefix.ndim != 3 or prefix.shape[-1] != self.embed_dim:
            raise ValueError(f"caption_loss: prefix must be [batch, tokens, {self.embed_dim}] "
                             f"(the LLM's word-embedding width), got {prefix.shape}")
        if prompt_ids.ndim != 1:
            raise ValueError(f"caption_loss: prompt_ids must be [P] (one prompt for the batch), "
                             f"got {prompt_ids.shape}")
        if ids.shape != mask.shape or ids.ndim != 2 or ids.shape[0] != prefix.shape[0]:
            raise ValueError(f"caption_loss: ids and mask must both be [batch={prefix.shape[0]}, "
                             f"length], got {ids.shape} and {mask.shape}")

    # --- host-level ---

    def generate(self, llm_params: Any, prefix: Any, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, num_beams: int = 1, length_penalty: float = 1.0
                 ) -> np.ndarray:
        """Greedy (num_beams=1) or beam-search continuations of [prefix ; prompt].

        Args:
          llm_params: the LLM's params ({'params': ...} or the inner tree).
          prefix: [B, T, D] visual prefix (jax or numpy).
          prompts: B token-id lists, lengths may differ (e.g. one VQA question per image).
          max_new_tokens: tokens generated per row.
          num_beams, length_penalty: transformers' beam-search settings (early_stopping=False).

        Returns:
          [B, max_new_tokens] int32 generated tokens only; after a row's EOS, pad_token_id.
        """
        prefix = jnp.asarray(prefix)
        if prefix.ndim != 3 or prefix.shape[-1] != self.embed_dim:
            raise ValueError(f"generate: prefix must be [batch, tokens, {self.embed_dim}], got "
                             f"{prefix.shape}")
        if isinstance(prompts, (str, bytes)) or len(prompts) != prefix.shape[0]:
            raise ValueError(f"generate: prompts must be a list of {prefix.shape[0]} token-id lists "
                             "(one per prefix row); tokenise text first")
        if int(max_new_tokens) < 1 or int(num_beams) < 1:
            raise ValueError(f"generate: max_new_tokens and num_beams must be >= 1, got "
                             f"{max_new_tokens} and {num_beams}")
        ids, mask = pad_prompts([list(map(int, p)) for p in prompts], self.pad_token_id,
                                left=self.left_pad)
        out = self._search(_tree(llm_params), prefix, jnp.asarray(ids), jnp.asarray(mask),
                           int(max_new_tokens), int(num_beams), float(length_penalty))
        return np.asarray(jax.device_get(out), np.int32)

    def _search(self, params, prefix, ids, mask, max_new_tokens, num_beams, length_penalty,
                prefix_mask=None):
        raise NotImplementedError

    def embed_segments(self, llm_params: Any, rows: Sequence[Sequence[Any]]
                       ) -> tuple[jax.Array, np.ndarray]:
        """Interleaved inputs -> one embedded sequence per row, e.g. a few-shot VQA prompt
        [prefix_1 ; text_1 ; prefix_2 ; text_2 ; prefix_q ; question].

        Args:
          rows: B lists of segments, in order; a segment is either embeddings [T, D] (a visual
            prefix; jax or numpy) or a list of token ids (embedded with the LLM's input table).

        Returns:
          (embeds [B, L, D] in the LLM's dtype, mask [B, L] int32, 1 = real slot). Each row is
          padded AS A WHOLE, on the side generation needs (``left_pad``: the left for decoder-only
          models, whose positions skip masked slots; the right for T5, whose relative positions
          count slots, so real slots stay contiguous), to L = the longest row rounded up to a
          multiple of ``PROMPT_MULTIPLE``.
        """
        words = self.word_embeddings(llm_params)
        blocks, layout = [], []  # layout[b]: (is_token, index) per real slot
        n_block_rows = 0
        for row in rows:
            slots = []
            for seg in row:
                if getattr(seg, "ndim", 1) == 2:
                    if seg.shape[-1] != self.embed_dim:
                        raise ValueError(f"embed_segments: an embedded segment must be [tokens, "
                                         f"{self.embed_dim}], got {tuple(seg.shape)}")
                    blocks.append(jnp.asarray(seg))
                    slots += [(False, n_block_rows + t) for t in range(seg.shape[0])]
                    n_block_rows += int(seg.shape[0])
                else:
                    slots += [(True, int(t)) for t in seg]
            layout.append(slots)
        if not layout or not all(layout):
            raise ValueError("embed_segments: every row needs at least one segment slot")
        longest = max(len(x) for x in layout)
        length = math.ceil(longest / PROMPT_MULTIPLE) * PROMPT_MULTIPLE
        ids = np.zeros((len(rows), length), np.int32)
        index = np.zeros((len(rows), length), np.int32)
        is_token = np.zeros((len(rows), length), bool)
        mask = np.zeros((len(rows), length), np.int32)
        for b, slots in enumerate(layout):
            start = length - len(slots) if self.left_pad else 0
            for k, (tok, i) in enumerate(slots):
                (ids if tok else index)[b, start + k] = i
                is_token[b, start + k] = tok
            mask[b, start:start + len(slots)] = 1
        stacked = (jnp.concatenate(blocks).astype(words.dtype) if blocks
                   else jnp.zeros((1, words.shape[1]), words.dtype))
        return _assemble(words, stacked, ids, index, is_token), mask

    def generate_interleaved(self, llm_params: Any, rows: Sequence[Sequence[Any]], *,
                             max_new_tokens: int, num_beams: int = 1,
                             length_penalty: float = 1.0) -> np.ndarray:
        """Greedy / beam-search continuations of interleaved rows (``embed_segments``): what
        ``generate`` does for [prefix ; prompt], for any order of embedded and token segments
        (T5: the whole row is the encoder input). Returns [B, max_new_tokens] int32 as
        ``generate``."""
        if int(max_new_tokens) < 1 or int(num_beams) < 1:
            raise ValueError(f"generate: max_new_tokens and num_beams must be >= 1, got "
                             f"{max_new_tokens} and {num_beams}")
        embeds, mask = self.embed_segments(llm_params, rows)
        empty = jnp.zeros((embeds.shape[0], 0), jnp.int32)  # every slot is in the prefix
        out = self._search(_tree(llm_params), embeds, empty, empty, int(max_new_tokens),
                           int(num_beams), float(length_penalty), prefix_mask=jnp.asarray(mask))
        return np.asarray(jax.device_get(out), np.int32)

    def decode(self, tokens: Any) -> list[str]:
        """[B, N] generated tokens -> B strings: cut at the first EOS, special tokens skipped,
        whitespace collapsed and stripped."""
        if self.tokenizer is None:
            raise ValueError("decode: this FrozenLLM has no tokenizer (plan mode); build it with "
                             "a tokenizer to turn tokens into text")
        texts = []
        for row in np.asarray(tokens):
            row = [int(t) for t in row]
            if self.eos_token_id in row:
                row = row[:row.index(self.eos_token_id)]
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            texts.append(" ".join(text.split()))
        return texts


class DecoderOnlyLLM(FrozenLLM):
    """OPT / Llama: [prefix ; prompt ; caption] through the causal LM."""

    left_pad = True

    def __init__(self, family: str, module: nn.Module, tokenizer: Any, **ids: Any) -> None:
        self.family = family
        super().__init__(module, tokenizer, **ids)
        decoder = models.family_module(family)
        # Static arguments of generate.py's jits: built once so every call hits the same cache.
        self._apply = module.apply
        self._embed_fn = decoder.embed_tokens
        self._cache_fn = functools.partial(decoder.init_cache, module.config, dtype=module.dtype,
                                           mesh=self.mesh)

    @property
    def embed_dim(self) -> int:
        cfg = self.module.config
        return int(getattr(cfg, "word_embed_proj_dim", None) or cfg.hidden_size)

    def word_embeddings(self, llm_params: Any) -> jax.Array:
        return _tree(llm_params)["embed_tokens"]["embedding"]

    def text_hidden(self, llm_params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        # Right padding: the default positions 0..L-1 are every real token's true position.
        return self.module.apply({"params": _tree(llm_params)}, ids,
                                 attention_mask=mask)["hidden_states"]

    def caption_loss(self, llm_params: Any, prefix: jax.Array, prompt_ids: jax.Array,
                     ids: jax.Array, mask: jax.Array) -> jax.Array:
        self._check_loss_args(prefix, prompt_ids, ids, mask)
        params = _tree(llm_params)
        words = self.word_embeddings(params)
        b, t = prefix.shape[:2]
        prompt = jnp.broadcast_to(prompt_ids[None, :], (b, prompt_ids.shape[0]))
        text_embeds = jnp.take(words, jnp.concatenate([prompt, ids], axis=1), axis=0)
        inputs = jnp.concatenate([prefix.astype(text_embeds.dtype), text_embeds], axis=1)
        before = t + prompt.shape[1]
        attn = jnp.concatenate([jnp.ones((b, before), jnp.int32), mask.astype(jnp.int32)], axis=1)
        # Right padding only: positions 0..N-1 are the real positions for every real token.
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), attn.shape)
        run = functools.partial(self._loss_module.apply, {"params": params}, inputs_embeds=inputs,
                                attention_mask=attn, positions=positions)
        if not self.loss_chunk:
            targets, loss_mask = caption_targets(before, ids, mask)
            return losses.masked_cross_entropy(run()["logits"], targets, loss_mask)
        # Positions before-1 .. before+L-2 predict the L caption tokens; no other is scored.
        # (logits_to_keep=1: the model's own head on one position, unused and dropped by XLA.)
        hidden = run(logits_to_keep=1)["hidden_states"][:, before - 1:before - 1 + ids.shape[1]]
        head, vocab_axis = self.head_matrix(params)
        return losses.chunked_cross_entropy(hidden, head, ids, mask, chunk_size=self.loss_chunk,
                                            vocab_axis=vocab_axis)

    def head_matrix(self, llm_params: Any) -> tuple[jax.Array, int]:
        """The LM head: (embed_tokens [V, E], 0) when tied, else (lm_head kernel [E, V], 1)."""
        params = _tree(llm_params)
        if self.module.config.tie_word_embeddings:
            return params["embed_tokens"]["embedding"], 0
        return params["lm_head"]["kernel"], 1

    def generate(self, llm_params, prefix, prompts, **kw) -> np.ndarray:
        # Left padding puts each row's last real token in the last slot, where generation
        # starts: a row needs at least one prompt token after its prefix.
        if any(len(p) == 0 for p in prompts):
            raise ValueError(f"generate: {self.family} needs at least one prompt token per row "
                             "after the visual prefix (e.g. the tokenised 'A picture of')")
        return super().generate(llm_params, prefix, prompts, **kw)

    def _search(self, params, prefix, ids, mask, max_new_tokens, num_beams, length_penalty,
                prefix_mask=None):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                  eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                  prefix_embeds=prefix, embed_fn=self._embed_fn, init_cache_fn=self._cache_fn,
                  mesh=self.mesh, prefix_mask=prefix_mask)
        if num_beams == 1:
            return gen.greedy_search(self._apply, {"params": params}, **kw)
        return gen.beam_search(self._apply, {"params": params}, num_beams=num_beams,
                               length_penalty=length_penalty, **kw)


class EncoderDecoderLLM(FrozenLLM):
    """T5: [prefix ; prompt] is the encoder input; the caption is decoded."""

    family = "t5"
    left_pad = False  # right padding keeps prefix-to-prompt relative positions exact

    def __init__(self, module: nn.Module, tokenizer: Any, **ids: Any) -> None:
        super().__init__(module, tokenizer, **ids)
        cfg = module.config
        # t5.py's searches stop at and pad with the module config's ids; captions were
        # tokenised with the tokenizer's, so generation uses a copy carrying those.
        self._gen_module = module
        if (cfg.eos_token_id, cfg.pad_token_id) != (self.eos_token_id, self.pad_token_id):
            self._gen_module = module.clone(config=dataclasses.replace(
                cfg, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id))

    @property
    def embed_dim(self) -> int:
        return int(self.module.config.d_model)

    def word_embeddings(self, llm_params: Any) -> jax.Array:
        return _tree(llm_params)["shared"]["embedding"]

    def text_hidden(self, llm_params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return self.module.apply({"params": _tree(llm_params)}, ids, mask, method=t5.T5.encode)

    def caption_loss(self, llm_params: Any, prefix: jax.Array, prompt_ids: jax.Array,
                     ids: jax.Array, mask: jax.Array) -> jax.Array:
        self._check_loss_args(prefix, prompt_ids, ids, mask)
        params = _tree(llm_params)
        words = self.word_embeddings(params)
        b = prefix.shape[0]
        prompt = jnp.take(words, jnp.broadcast_to(prompt_ids[None, :], (b, prompt_ids.shape[0])),
                          axis=0)
        enc_in = jnp.concatenate([prefix.astype(prompt.dtype), prompt], axis=1)
        enc_mask = jnp.ones(enc_in.shape[:2], jnp.int32)
        # transformers' shift_right: decoder input = [decoder_start ; labels[:-1]]. The caption
        # is right-padded, so causal attention alone keeps real positions off the padding.
        start = jnp.full((b, 1), self.module.config.decoder_start_token_id, jnp.int32)
        dec_in = jnp.concatenate([start, ids[:, :-1].astype(jnp.int32)], axis=1)
        out = self._loss_module.apply({"params": params}, None, dec_in, attention_mask=enc_mask,
                                      inputs_embeds=enc_in)
        if not self.loss_chunk:
            return losses.masked_cross_entropy(out["logits"], ids, mask)
        # The model's own logits go unused and XLA drops them; the head runs chunk by chunk.
        cfg = self.module.config
        tied = cfg.tie_word_embeddings
        head = params["shared"]["embedding"] if tied else params["lm_head"]["kernel"]
        scale = cfg.d_model ** -0.5 if tied and cfg.scale_decoder_outputs else 1.0
        return losses.chunked_cross_entropy(out["hidden_states"], head, ids, mask,
                                            chunk_size=self.loss_chunk, vocab_axis=0 if tied else 1,
                                            scale=scale)

    def _search(self, params, prefix, ids, mask, max_new_tokens, num_beams, length_penalty,
                prefix_mask=None):
        variables = {"params": params}
        if num_beams == 1:
            out = t5.greedy_generate(self._gen_module, variables, ids, mask,
                                     max_new_tokens=max_new_tokens, prefix_embeds=prefix,
                                     mesh=self.mesh, prefix_mask=prefix_mask)
            return out["sequences"][:, 1:]  # drop the decoder-start token
        out = t5.beam_search(self._gen_module, variables, ids, mask, max_new_tokens=max_new_tokens,
                             num_beams=num_beams, length_penalty=length_penalty,
                             prefix_embeds=prefix, mesh=self.mesh, prefix_mask=prefix_mask)
        return out["sequences"][:, 0, 1:]  # the best beam, without the decoder-start token


def make_llm(family: str, module: nn.Module, tokenizer: Any, *, eos_token_id: int | None = None,
             pad_token_id: int | None = None, mesh: Any = None, remat: str = "none",
             loss_chunk: int = 0) -> FrozenLLM:
    """Wraps a loaded LLM (models/opt.py, llama.py or t5.py ``load``) for VLAP.

    eos_token_id / pad_token_id override the tokenizer's (default), which override the model
    config's. mesh: generation keeps the KV cache sharded on it (batch over data/fsdp, heads
    over tensor); None = wherever XLA puts it. remat, loss_chunk: caption_loss's layer
    rematerialisation policy and cross-entropy chunk (``config.model.llm_remat``,
    ``caption_loss_chunk``; the module docstring).
    """
    ids = dict(eos_token_id=eos_token_id, pad_token_id=pad_token_id, mesh=mesh, remat=remat,
               loss_chunk=loss_chunk)
    if family in ("opt", "llama"):
        return DecoderOnlyLLM(family, module, tokenizer, **ids)
    if family == "t5":
        return EncoderDecoderLLM(module, tokenizer, **ids)
    raise ValueError(f"make_llm: family {family!r} is not known; use one of {FAMILIES}")


def load_llm(m: ml_collections.ConfigDict, mesh: Any = None, abstract: bool = False
             ) -> tuple[FrozenLLM, Any]:
    """(FrozenLLM, params) for ``config.model``'s LLM, through ``models.load_pretrained``.

    Weights are cast to ``llm_dtype``. abstract=True (plan mode) reads no tensor and no tokenizer
    (``llm.tokenizer`` is None): from the checkpoint's config.json or GGUF metadata when
    ``llm_path`` is local, else from the architecture ``config.model.llm_arch``.
    """
    family, path = m.llm_family, str(m.llm_path)
    if family not in FAMILIES:
        raise ValueError(f"config.model.llm_family={family!r} is not known; use 'opt', 'llama' "
                         "(HF folder or .gguf file) or 't5'")
    arch = models.plan_architecture(path, m.get("llm_arch"), "config.model.llm_arch") \
        if abstract else None
    # Known before any weight is read (a local folder, a GGUF file, a preset), else once a hub
    # name is loaded.
    held = models.family(arch) if arch else models.checkpoint_family(path)
    if held in (None, family):
        module, variables, hf_config = models.load_pretrained(
            None if arch else path, dtype=jnp.dtype(m.get("llm_dtype", "float32")), mesh=mesh,
            abstract=abstract, hf_config=arch)
        held = models.family(hf_config)
    if held != family:
        hint = " (GGUF files hold decoder-only Llama-family models)" if path.endswith(".gguf") \
            else ""
        raise ValueError(f"config.model.llm_family={family!r} but config.model.llm_path {path} "
                         f"holds a {held!r}-family model{hint}; set the family it holds")
    tokenizer = None if abstract else models.load_tokenizer(m.get("tokenizer_path") or path)
    llm = make_llm(family, module, tokenizer, mesh=None if abstract else mesh,
                   remat=str(m.get("llm_remat", "none")),
                   loss_chunk=int(m.get("caption_loss_chunk", 0)))
    return llm, variables["params"]


def prompt_len(m: ml_collections.ConfigDict) -> int:
    """Prompt tokens in plan mode: tokenised with a local tokenizer folder, else prompt_len."""
    folder = m.get("tokenizer_path") or m.llm_path
    if os.path.isdir(os.path.expanduser(str(folder))):
        return len(models.load_tokenizer(folder)(m.prompt, add_special_tokens=False)["input_ids"])
    if int(m.get("prompt_len", 0)) < 1:
        raise ValueError("plan mode: no local tokenizer to count the prompt's tokens; set "
                         "config.model.prompt_len to their number (3 for 'A picture of' in OPT)")
    return int(m.prompt_len)
