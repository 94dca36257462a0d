"""Generation with the KV cache sharded on a mesh (4 of the 8 fake CPU devices: data=2, tensor=2).

The reference is the same generator without a mesh (itself checked token for token against
transformers in test_generate.py / test_llama.py / test_t5.py): tokens must be identical. The
layout is checked twice: the buffers ``init_cache(..., mesh=)`` returns carry the expected
``.sharding.spec``, and inside the jitted loop a probe wrapped around the model's apply records
(``jax.debug.inspect_array_sharding``, at compile time) the sharding XLA gave every cache leaf going
into and out of each model call, prefill and decode steps alike.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lqae_vlap.models import generate, llama, opt, t5
from lqae_vlap.models.layers import kv_cache_sharding
from lqae_vlap.core.sharding import make_mesh
from tests.helpers import (LLAMA_VARIANTS, OPT_TINY as TINY, tiny_llama, tiny_opt_for_generation,
                           tiny_t5)

# [batch, length, heads, head_dim]: rows over data x fsdp, heads over tensor (LOGICAL_RULES).
CACHE_SPEC = P(("data", "fsdp"), None, "tensor", None)
NEW = 6
PAD = TINY["pad_token_id"]


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=jax.devices()[:4])


def left_padded(vocab: int, pad: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """ids [4, 6], rows 1 and 3 left-padded (by 2 and 3), and their mask."""
    ids = np.random.RandomState(seed).randint(3, vocab, size=(4, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[3, :3] = 0
    ids[mask == 0] = pad
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def probed(module, seen: list):
    """module.apply that records the compiled sharding of every cache leaf it takes and returns."""
    def apply_fn(params, **kw):
        out = module.apply(params, **kw)
        for leaf in jax.tree.leaves((kw["cache"], out["cache"])):
            jax.debug.inspect_array_sharding(leaf, callback=seen.append)
        return out
    return apply_fn


def assert_cache_layout(cache, mesh, heads: int) -> None:
    for leaf in jax.tree.leaves(cache):
        assert leaf.sharding.spec == CACHE_SPEC
        batch, length, _, dh = leaf.shape
        assert {s.data.shape for s in leaf.addressable_shards} == {(batch // 2, length, heads // 2, dh)}


def assert_all_sharded(seen: list, mesh, expected_count: int) -> None:
    want = NamedSharding(mesh, CACHE_SPEC)
    assert len(seen) >= expected_count, len(seen)
    bad = [s for s in seen if not s.is_equivalent_to(want, 4)]
    assert not bad, bad[:3]


def test_kv_cache_sharding_follows_the_rules(mesh):
    assert kv_cache_sharding(mesh, (4, 8, 4, 8)).spec == CACHE_SPEC
    # Axes that do not divide a dimension are dropped: 3 rows, 1 kv head stay whole.
    assert kv_cache_sharding(mesh, (3, 8, 1, 8)).spec == P(None, None, None, None)
    # The layout of the heads matches the q/k/v kernels' 'heads' axis on the same mesh.
    assert tuple(kv_cache_sharding(mesh, (4, 8, 4, 8)).spec)[2] == "tensor"


def test_opt_sharded_cache_generates_the_same_tokens(tmp_path, mesh):
    _, module, variables, cache_fn = tiny_opt_for_generation(tmp_path, seed=0)
    _, sharded_vars, _ = opt.load(tmp_path, mesh=mesh)
    sharded_cache_fn = opt.cache_fn(module.config, mesh=mesh)
    assert_cache_layout(sharded_cache_fn(4, 12), mesh, TINY["num_attention_heads"])
    ids, mask = left_padded(TINY["vocab_size"], PAD)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None,
              pad_token_id=PAD)
    expected = generate.greedy_search(module.apply, variables, init_cache_fn=cache_fn, **kw)
    seen: list = []
    got = generate.greedy_search(probed(module, seen), sharded_vars, init_cache_fn=sharded_cache_fn,
                                 mesh=mesh, **kw)
    np.testing.assert_array_equal(got, expected)
    layers = 2 * TINY["num_hidden_layers"]  # k and v
    assert_all_sharded(seen, mesh, 2 * 2 * layers)  # in + out, prefill + loop body

    expected = generate.beam_search(module.apply, variables, init_cache_fn=cache_fn, num_beams=2,
                                    **kw)
    seen.clear()
    got = generate.beam_search(probed(module, seen), sharded_vars, init_cache_fn=sharded_cache_fn,
                               num_beams=2, mesh=mesh, **kw)
    np.testing.assert_array_equal(got, expected)
    assert_all_sharded(seen, mesh, 2 * 2 * layers)


def test_llama_sharded_cache_generates_the_same_tokens(tmp_path, mesh):
    # GQA: 4 query heads, 2 kv heads, so the cache's kv heads split over tensor=2.
    tiny_llama(0, **LLAMA_VARIANTS["untied_bias"]).save_pretrained(tmp_path)
    module, variables, _ = llama.load(tmp_path)
    _, sharded_vars, _ = llama.load(tmp_path, mesh=mesh)
    kv_heads = module.config.num_key_value_heads
    assert_cache_layout(llama.init_cache(module.config, 4, 12, mesh=mesh), mesh, kv_heads)
    ids, mask = left_padded(module.config.vocab_size, 0, seed=1)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None,
              pad_token_id=0)
    expected = generate.greedy_search(module.apply, variables,
                                      init_cache_fn=llama.cache_fn(module.config), **kw)
    seen: list = []
    got = generate.greedy_search(probed(module, seen), sharded_vars,
                                 init_cache_fn=llama.cache_fn(module.config, mesh=mesh), mesh=mesh,
                                 **kw)
    np.testing.assert_array_equal(got, expected)
    assert_all_sharded(seen, mesh, 2 * 2 * 2 * module.config.num_hidden_layers)


def test_t5_sharded_cache_generates_the_same_tokens(tmp_path, mesh):
    tiny_t5("gated", tmp_path)
    module, variables, _ = t5.load(tmp_path)
    _, sharded_vars, _ = t5.load(tmp_path, mesh=mesh)
    assert_cache_layout(t5.init_cache(module.config, 4, 8, mesh=mesh), mesh, module.config.num_heads)
    ids = np.random.RandomState(2).randint(2, module.config.vocab_size, size=(4, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    ids, mask = jnp.asarray(ids * mask, jnp.int32), jnp.asarray(mask, jnp.int32)
    expected = t5.greedy_generate(module, variables, ids, mask, max_new_tokens=NEW)
    got = t5.greedy_generate(module, sharded_vars, ids, mask, max_new_tokens=NEW, mesh=mesh)
    np.testing.assert_array_equal(got["sequences"], expected["sequences"])
    expected = t5.beam_search(module, variables, ids, mask, max_new_tokens=NEW, num_beams=2)
    got = t5.beam_search(module, sharded_vars, ids, mask, max_new_tokens=NEW, num_beams=2, mesh=mesh)
    np.testing.assert_array_equal(got["sequences"], expected["sequences"])
    # The loop's cache layout, read from the compiled (per-device) program: every cache write is
    # a dynamic-update-slice into a [batch/2, NEW, heads/2, d_kv] buffer, none into a whole one.
    hlo = t5.greedy_generate.lower(module, sharded_vars, ids, mask, max_new_tokens=NEW,
                                   mesh=mesh).compile().as_text()
    d_kv, heads = module.config.d_kv, module.config.num_heads
    writes = re.findall(rf"= f32\[(\d+),{NEW},(\d+),{d_kv}\]\S* dynamic-update-slice\(", hlo)
    assert len(writes) >= 2 * module.config.num_decoder_layers, writes  # key and value per layer
    assert set(writes) == {("2", str(heads // 2))}, writes
