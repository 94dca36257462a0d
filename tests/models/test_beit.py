"""Beit against transformers' PyTorch BeitModel (the parity reference), float32 atol 1e-4.

Tiny random checkpoints (image 32, patch 8 -> 16 patches + CLS, width 32, 2 layers, 4 heads) are
saved once per module with save_pretrained, one per layout:
  'per_layer':  BeitModel, a relative position bias table in every layer, mean pooling (its
                pooler LayerNorm), layer scale;
  'final_norm': BeitModel, per-layer bias, no mean pooling (a final LayerNorm), absolute
                positions;
  'mim':        BeitForMaskedImageModeling as microsoft/beit-base-patch16-224-pt22k: 'beit.'
                prefix, one shared bias table, mask token, the MIM head's layernorm / lm_head.
Every weight is re-drawn with std 0.2 (norm scales 1 + N(0, 0.2)), so the layer-scale vectors
and bias tables are far from their init values (0.1 and zeros) and matter: a test checks that
resetting them moves the output by far more than the tolerance. The reference is BeitModel
loaded from each folder (for 'mim' that is what VLAP's authors run).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import BeitConfig as HFBeitConfig
from transformers import BeitForMaskedImageModeling, BeitModel, BertConfig

from lqae_vlap import models
from lqae_vlap.core.sharding import LOGICAL_RULES
from lqae_vlap.models.beit import Beit, BeitConfig, load, relative_position_index
from tests.helpers import ALLOWED_AXES, rerandomise

ATOL = 1e-4  # float32 parity with PyTorch; observed differences are ~1e-6
# bfloat16 keeps 8 mantissa bits (relative step 2^-8); through 2 blocks of width 32 the observed
# error is ~1% of the output's scale, so allow 4% of max |float32 reference| (as for CLIP).
BF16_REL = 0.04
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, vocab_size=16)
LAYOUTS = {
    "per_layer": (BeitModel, dict(use_relative_position_bias=True, use_mean_pooling=True)),
    "final_norm": (BeitModel, dict(use_relative_position_bias=True, use_mean_pooling=False,
                                   use_absolute_position_embeddings=True)),
    "mim": (BeitForMaskedImageModeling, dict(use_shared_relative_position_bias=True,
                                             use_mask_token=True)),
}
BATCH = 3


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """{layout: (folder, the BeitModel reference loaded from it)}."""
    out = {}
    for seed, (name, (cls, extra)) in enumerate(LAYOUTS.items()):
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(seed)
        rerandomise(cls(HFBeitConfig(**TINY, **extra))).save_pretrained(folder)
        out[name] = (folder, BeitModel.from_pretrained(folder).eval())
    return out


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """[3, 32, 32, 3] channels-last float32, roughly [-1, 1]-normalised in scale."""
    return np.random.RandomState(0).randn(BATCH, 32, 32, 3).astype(np.float32)


def torch_beit(model, images: np.ndarray, **kw):
    """HF reference on our channels-last images (torch wants channels first)."""
    with torch.no_grad():
        return model(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)),
                     output_hidden_states=True, **kw)


@functools.lru_cache(maxsize=None)
def _jitted(config, dtype):
    # One compile per architecture and dtype, shared by the tests (and by None / a mask).
    module = Beit(config, dtype=dtype, param_dtype=dtype)
    return jax.jit(lambda v, x, m: module.apply(v, x, bool_masked_pos=m,
                                                output_hidden_states=True))


def forward(module, variables, images, bool_masked_pos=None):
    return _jitted(module.config, module.dtype)(variables, images, bool_masked_pos)


def close(actual, expected, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected), rtol=0,
                               atol=atol)


def test_checkpoint_layouts_are_as_documented(ckpts):
    # The loader's name map rests on these layouts (transformers 5 saves the transformers-4
    # names); fail loudly if they change.
    keys = {k: set(load_file(ckpts[k][0] / "model.safetensors")) for k in ckpts}
    table = "relative_position_bias_table"
    assert f"encoder.layer.1.attention.attention.relative_position_bias.{table}" in keys["per_layer"]
    assert "encoder.layer.0.attention.attention.key.weight" in keys["per_layer"]
    assert "encoder.layer.0.attention.attention.key.bias" not in keys["per_layer"]
    assert "encoder.layer.0.lambda_1" in keys["per_layer"]
    assert "pooler.layernorm.weight" in keys["per_layer"]
    assert {"layernorm.weight", "embeddings.position_embeddings"} <= keys["final_norm"]
    assert {"beit.embeddings.mask_token", f"beit.encoder.relative_position_bias.{table}",
            "layernorm.weight", "lm_head.weight"} <= keys["mim"]
    assert not any("pooler" in k or k.startswith("beit.layernorm") for k in keys["mim"])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_pytorch_beit_model(ckpts, pixels, layout):
    folder, model = ckpts[layout]
    pooled = layout != "mim"  # a MIM checkpoint holds no pooler
    module, variables, hf_config = models.load_pretrained(folder, add_pooling_layer=pooled)
    assert isinstance(module, Beit) and hf_config.model_type == "beit"
    out, ref = forward(module, variables, pixels), torch_beit(model, pixels)
    assert out["last_hidden_state"].shape == (BATCH, 1 + 16, 32)
    close(out["last_hidden_state"], ref.last_hidden_state)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
        close(ours, theirs)
    if pooled:
        close(out["pooled"], ref.pooler_output)
    else:
        assert "pooled" not in out


def test_mim_layout_params(ckpts):
    _, variables, _ = load(ckpts["mim"][0])
    p = variables["params"]
    assert p["embeddings"]["mask_token"].shape == (32,)
    assert p["shared_relative_position_bias"]["relative_position_bias_table"].shape == (7 * 7 + 3, 4)
    assert "relative_position_bias" not in p["layers_0"] and "layernorm" not in p
    with pytest.raises(ValueError, match=r"missing keys.*pooler\.layernorm\.weight"):
        load(ckpts["mim"][0], add_pooling_layer=True)


def test_mask_token_matches_pytorch(ckpts, pixels):
    folder, model = ckpts["mim"]
    module, variables, _ = load(folder)
    masked = np.random.RandomState(1).rand(BATCH, 16) < 0.4
    out = forward(module, variables, pixels, bool_masked_pos=jnp.asarray(masked))
    ref = torch_beit(model, pixels, bool_masked_pos=torch.as_tensor(masked))
    close(out["last_hidden_state"], ref.last_hidden_state)
    plain = forward(module, variables, pixels)["last_hidden_state"]
    assert np.abs(np.asarray(plain) - ref.last_hidden_state.numpy()).max() > 100 * ATOL


@pytest.mark.parametrize("layout", ["per_layer", "mim"])
def test_layer_scale_and_bias_tables_matter(ckpts, pixels, layout):
    """Resetting the randomised lambdas and tables to their init moves the output far beyond
    ATOL, so the parity above checks them."""
    folder, model = ckpts[layout]
    module, variables, _ = load(folder)
    want = torch_beit(model, pixels).last_hidden_state.numpy()

    def reset(path, leaf):
        name = path[-1].key
        if name.startswith("lambda_"):
            return jnp.full_like(leaf, 0.1)  # layer_scale_init_value
        return jnp.zeros_like(leaf) if name == "relative_position_bias_table" else leaf

    for which in ("lambda_", "relative_position_bias_table"):
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: reset(p, x) if p[-1].key.startswith(which) else x, variables)
        got = forward(module, params, pixels)["last_hidden_state"]
        assert np.abs(np.asarray(got) - want).max() > 1000 * ATOL, which


def test_relative_position_index_by_hand():
    # W = 2: patches (0,0) (0,1) (1,0) (1,1); offsets (dr, dc) + 1 flattened as 3 * dr + dc.
    index = relative_position_index(2)
    assert index.shape == (5, 5)
    assert index[1, 1] == 4  # (0, 0) offset: the centre of the 3 x 3 offsets
    assert index[1, 4] == 3 * (0 - 1 + 1) + (0 - 1 + 1)  # (0,0) -> (1,1): offset (-1, -1) -> 0
    assert index[4, 1] == 8  # offset (1, 1)
    assert index[2, 3] == 3 * (0 - 1 + 1) + (1 - 0 + 1)  # (0,1) -> (1,0): (-1, 1) -> 2
    assert index[0, 1:].tolist() == [9] * 4 and index[1:, 0].tolist() == [10] * 4
    assert index[0, 0] == 11


def test_bfloat16_forward_stays_close(ckpts, pixels):
    for layout in ("per_layer", "mim"):
        folder, model = ckpts[layout]
        module, variables, _ = load(folder, dtype=jnp.bfloat16)
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(variables))
        out = forward(module, variables, pixels)["last_hidden_state"]
        assert out.dtype == jnp.bfloat16
        ref = torch_beit(model, pixels).last_hidden_state.numpy()
        close(out, ref, atol=BF16_REL * np.abs(ref).max())


def test_every_weight_has_allowed_logical_axes():
    cfg = BeitConfig(**{k: v for k, v in TINY.items() if k != "vocab_size"},
                     use_mask_token=True, use_absolute_position_embeddings=True,
                     use_relative_position_bias=True, use_shared_relative_position_bias=True,
                     use_mean_pooling=True, add_pooling_layer=True)
    boxed = jax.eval_shape(Beit(cfg).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        names = leaf.names
        assert set(names) <= ALLOWED_AXES and len(set(names)) == len(names), names
        assert len(names) == len(leaf.value.shape)
    assert {name for name, _ in LOGICAL_RULES} >= ALLOWED_AXES


def test_older_checkpoints_with_index_buffers_load(ckpts, pixels, tmp_path):
    # transformers 4 checkpoints (e.g. the hub's pt22k) also carry relative_position_index.
    folder, model = ckpts["mim"]
    state = load_file(folder / "model.safetensors")
    state["beit.encoder.relative_position_bias.relative_position_index"] = \
        relative_position_index(4).astype(np.int64)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    module, variables, _ = load(tmp_path)
    close(forward(module, variables, pixels)["last_hidden_state"],
          torch_beit(model, pixels).last_hidden_state)


def test_abstract_load_equals_the_real_load(ckpts):
    folder = ckpts["mim"][0]
    _, real, hf_config = load(folder, dtype=jnp.bfloat16)
    spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert spec(load(folder, dtype=jnp.bfloat16, abstract=True)[1]) == spec(real)
    arch = {k: v for k, v in hf_config.to_dict().items() if not k.startswith("_")}
    abstract = models.load_pretrained(hf_config=arch, dtype=jnp.bfloat16, abstract=True)[1]
    assert spec(abstract) == spec(real)
    assert models.checkpoint_family(folder) == "beit"


def test_bad_inputs_raise_clear_errors(ckpts):
    with pytest.raises(ValueError, match="not a BEiT checkpoint"):
        BeitConfig.from_hf(BertConfig())
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        BeitConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="only square"):
        BeitConfig.from_hf(HFBeitConfig(**dict(TINY, image_size=[32, 16])))
    module, variables, _ = load(ckpts["per_layer"][0])
    with pytest.raises(ValueError, match="channels first"):
        jax.eval_shape(module.apply, variables, jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="needs a checkpoint with use_mask_token"):
        jax.eval_shape(lambda v, x: module.apply(v, x, bool_masked_pos=jnp.zeros((1, 16), bool)),
                       variables, jnp.zeros((1, 32, 32, 3)))
