"""greedy_search / beam_search against transformers' ``generate`` on tiny random OPT models.

The reference is OPTForCausalLM.generate (PyTorch) on the same left-padded batch: outputs must be
equal token for token. EOS ids are chosen from the reference's own output when nothing stops it,
so rows really do stop early and the pad-after-EOS path runs.
Each jitted decoder compiles once per static configuration, so the tests share one batch shape.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lqae_vlap.models import generate, opt
from tests.helpers import OPT_TINY as TINY, tiny_opt_for_generation

PAD, NEW = 1, 8  # pad id; tokens generated per row


@pytest.fixture(scope="module")
def pre_ln(tmp_path_factory):
    return tiny_opt_for_generation(tmp_path_factory.mktemp("pre_ln"), seed=0)


@pytest.fixture(scope="module")
def post_ln(tmp_path_factory):
    return tiny_opt_for_generation(tmp_path_factory.mktemp("post_ln"), seed=1,
                                   word_embed_proj_dim=16, do_layer_norm_before=False)


def left_padded(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids [3, 6], rows 1 and 2 left-padded by 2 and 4, and their mask."""
    ids = np.random.RandomState(seed).randint(3, TINY["vocab_size"], size=(3, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids[mask == 0] = PAD
    return ids, mask


def hf_generate(model, eos, ids=None, mask=None, **kw) -> np.ndarray:
    """transformers' new tokens, padded with PAD to NEW columns (it stops when all rows end)."""
    args = dict(attention_mask=torch.as_tensor(mask))
    if ids is not None:
        args["input_ids"] = torch.as_tensor(ids)
    with torch.no_grad():
        out = model.generate(**args, **kw, do_sample=False, max_new_tokens=NEW, pad_token_id=PAD,
                             eos_token_id=eos).numpy()
    if ids is not None:  # with input_ids the prompt is echoed; with inputs_embeds it is not
        out = out[:, ids.shape[1]:]
    return np.pad(out, ((0, 0), (0, NEW - out.shape[1])), constant_values=PAD)


def stopping_eos(model, ids, mask) -> int:
    """A token row 0 emits at step 2 when nothing stops it: as EOS it ends row 0 early."""
    return int(hf_generate(model, TINY["eos_token_id"], ids, mask)[0, 2])


def test_greedy_matches_transformers(pre_ln):
    model, module, variables, cache_fn = pre_ln
    ids, mask = left_padded()
    eos = stopping_eos(model, ids, mask)
    expected = hf_generate(model, eos, ids, mask)
    assert (expected[0, 3:] == PAD).all()  # row 0 really stops, the rest is pad
    out = generate.greedy_search(module.apply, variables, input_ids=jnp.asarray(ids, jnp.int32),
                                 attention_mask=jnp.asarray(mask, jnp.int32), max_new_tokens=NEW,
                                 eos_token_id=eos, pad_token_id=PAD, init_cache_fn=cache_fn)
    assert out.shape == (3, NEW) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out, expected)


def test_beam_search_matches_transformers(pre_ln):
    model, module, variables, cache_fn = pre_ln
    # Six rows, four of them left-padded, for enough finished hypotheses that the length penalty,
    # the early-stop heuristic and the 'never' mode change outputs (each was seen to break this
    # test when perturbed).
    ids = np.random.RandomState(3).randint(3, TINY["vocab_size"], size=(6, 6))
    mask = np.ones_like(ids)
    for row, pads in ((1, 2), (2, 4), (4, 1), (5, 3)):
        mask[row, :pads] = 0
    ids[mask == 0] = PAD
    # EOS ids: the two tokens transformers' beams emit most when nothing stops them.
    free = hf_generate(model, TINY["eos_token_id"], ids, mask, num_beams=3)
    values, counts = np.unique(free, return_counts=True)
    # EOS, length_penalty and early_stopping are traced, so every case shares one compile.
    stopped = []
    for eos in values[np.argsort(-counts, kind="stable")][:2].tolist():
        for early_stopping, length_penalty in [(False, 1.0), (False, -1.0), (True, 2.0),
                                               ("never", 0.5), ("never", 1.5)]:
            kw = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping)
            expected = hf_generate(model, eos, ids, mask, **kw)
            out = generate.beam_search(
                module.apply, variables, input_ids=jnp.asarray(ids, jnp.int32),
                attention_mask=jnp.asarray(mask, jnp.int32), max_new_tokens=NEW, eos_token_id=eos,
                pad_token_id=PAD, init_cache_fn=cache_fn, **kw)
            np.testing.assert_array_equal(out, expected, err_msg=f"eos={eos} {kw}")
            stopped.append(bool((expected == PAD).any()))
    assert sum(stopped) >= 8, stopped  # most cases did end some hypotheses on EOS


def test_prefix_embeds_equal_inputs_embeds_to_full_model(post_ln):
    # The opt-350m layout: prefix vectors have the narrow word-embedding width (project_in runs).
    model, module, variables, cache_fn = post_ln
    ids, mask = left_padded(seed=5)
    prefix = np.random.RandomState(6).normal(0, 0.5, size=(3, 4, 16)).astype(np.float32)
    # The same sequence as transformers sees it: [prefix][left-padded prompt] with one mask.
    table = model.get_input_embeddings().weight.detach().numpy()
    embeds = np.concatenate([prefix, table[ids]], axis=1)
    full_mask = np.concatenate([np.ones((3, 4), np.int64), mask], axis=1)
    expected = hf_generate(model, TINY["eos_token_id"], mask=full_mask,
                           inputs_embeds=torch.as_tensor(embeds))
    out = generate.greedy_search(module.apply, variables, input_ids=jnp.asarray(ids, jnp.int32),
                                 attention_mask=jnp.asarray(mask, jnp.int32), max_new_tokens=NEW,
                                 eos_token_id=TINY["eos_token_id"], pad_token_id=PAD,
                                 prefix_embeds=jnp.asarray(prefix), embed_fn=opt.embed_tokens,
                                 init_cache_fn=cache_fn)
    np.testing.assert_array_equal(out, expected)
    # The prefix matters: without it the continuation differs.
    plain = hf_generate(model, TINY["eos_token_id"], ids, mask)
    assert not (plain == expected).all()


def test_bad_arguments_raise_clear_errors(pre_ln):
    _, module, variables, cache_fn = pre_ln
    ids, mask = left_padded()
    kw = dict(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask, jnp.int32),
              max_new_tokens=NEW, eos_token_id=2, pad_token_id=PAD, init_cache_fn=cache_fn)
    with pytest.raises(ValueError, match="prefix_embeds needs embed_fn"):
        generate.greedy_search(module.apply, variables, **kw, prefix_embeds=jnp.zeros((3, 2, 32)))
    with pytest.raises(ValueError, match=r"prefix_embeds must be \[batch=3"):
        generate.greedy_search(module.apply, variables, **kw, prefix_embeds=jnp.zeros((2, 2, 32)),
                               embed_fn=opt.embed_tokens)
    with pytest.raises(ValueError, match="max_length=10 cannot hold"):
        generate.greedy_search(module.apply, variables, **kw, max_length=10)
    with pytest.raises(ValueError, match="attention_mask .* must match input_ids"):
        generate.greedy_search(module.apply, variables, **{**kw, "attention_mask": jnp.ones((3, 5))})
    with pytest.raises(ValueError, match="early_stopping must be"):
        generate.beam_search(module.apply, variables, **kw, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        generate.beam_search(module.apply, variables, **kw, num_beams=0)
