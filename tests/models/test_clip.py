"""CLIPVision against transformers' PyTorch CLIP (the parity reference), float32 atol 1e-4.

Three tiny random checkpoints (image 32, patch 8, width 32, 2 layers, 4 heads) are saved once per
module with save_pretrained: a CLIPVisionModel (transformers 5: keys without a prefix), a
CLIPVisionModelWithProjection and a full CLIPModel (both "vision_model.*" + "visual_projection").
Weights are re-drawn with std 0.2 so attention is far from uniform. Every forward runs through one
jitted function on the same [3, 32, 32, 3] batch, so each param-tree structure compiles once.
"""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from safetensors.numpy import load_file, save_file
from transformers import (BertConfig, CLIPConfig, CLIPModel, CLIPVisionConfig as HFVisionConfig,
                          CLIPVisionModel, CLIPVisionModelWithProjection)

from lqae_vlap.models.clip import CLIPVision, CLIPVisionConfig, load
from lqae_vlap.core.sharding import LOGICAL_RULES, make_mesh
from tests.helpers import ALLOWED_AXES, rerandomise

ATOL = 1e-4  # float32 parity with PyTorch; observed differences are ~1e-6
# bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through 2 blocks of width 32 the
# observed error is ~1% of the output's scale, so allow 4% of max |reference|.
BF16_REL = 0.04
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
            pad_token_id=1)
BATCH = 3


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """{'vision' | 'projection' | 'full': (folder, torch model)}."""
    built = {
        "vision": CLIPVisionModel(HFVisionConfig(**VISION)),
        "projection": CLIPVisionModelWithProjection(HFVisionConfig(**VISION)),
        "full": CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)),
    }
    out = {}
    for seed, (kind, model) in enumerate(built.items()):
        folder = tmp_path_factory.mktemp(kind)
        torch.manual_seed(seed)
        rerandomise(model).save_pretrained(folder)
        out[kind] = (folder, model)
    return out


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """[3, 32, 32, 3] channels-last float32, roughly CLIP-normalised in scale."""
    return np.random.RandomState(0).randn(BATCH, 32, 32, 3).astype(np.float32)


@jax.jit
def _forward(variables, images):
    # CLIPVision is rebuilt from static shapes, so one trace serves every checkpoint of a tree shape.
    cfg = CLIPVisionConfig(**{k: v for k, v in VISION.items() if k != "projection_dim"},
                           projection_dim=16 if "visual_projection" in variables["params"] else None)
    dtype = jax.tree.leaves(variables)[0].dtype
    return CLIPVision(cfg, dtype=dtype, param_dtype=dtype).apply(variables, images,
                                                                 output_hidden_states=True)


def torch_vision(model, images: np.ndarray):
    """HF reference on our channels-last images (torch wants channels first)."""
    x = torch.as_tensor(images.transpose(0, 3, 1, 2))
    with torch.no_grad():
        if isinstance(model, CLIPModel):
            return model.get_image_features(pixel_values=x, output_hidden_states=True)
        return model(pixel_values=x, output_hidden_states=True)


def close(actual, expected, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected), rtol=0, atol=atol)


def test_checkpoint_layouts_are_as_documented(ckpts):
    # The loader's prefix handling rests on these transformers-5 layouts; fail loudly if they change.
    keys = {k: set(load_file(ckpts[k][0] / "model.safetensors")) for k in ckpts}
    assert "embeddings.patch_embedding.weight" in keys["vision"]
    assert not any(k.startswith("vision_model.") for k in keys["vision"])
    for kind in ("projection", "full"):
        assert "vision_model.embeddings.patch_embedding.weight" in keys[kind]
        assert "visual_projection.weight" in keys[kind]
    assert any(k.startswith("text_model.") for k in keys["full"])


def test_vision_model_matches_pytorch(ckpts, pixels):
    folder, model = ckpts["vision"]
    module, variables, hf_config = load(folder)
    assert module.config.projection_dim is None and "visual_projection" not in variables["params"]
    out, ref = _forward(variables, pixels), torch_vision(model, pixels)
    assert out["last_hidden_state"].shape == (BATCH, 1 + 16, 32)
    close(out["last_hidden_state"], ref.last_hidden_state)
    close(out["pooled"], ref.pooler_output)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
        close(ours, theirs)
    assert "image_embeds" not in out


def test_vision_model_with_projection_matches_pytorch(ckpts, pixels):
    folder, model = ckpts["projection"]
    _, variables, _ = load(folder)
    out, ref = _forward(variables, pixels), torch_vision(model, pixels)
    assert out["image_embeds"].shape == (BATCH, 16)
    close(out["image_embeds"], ref.image_embeds)
    close(out["last_hidden_state"], ref.last_hidden_state)


def test_full_clip_model_matches_get_image_features(ckpts, pixels):
    folder, model = ckpts["full"]
    _, variables, hf_config = load(folder)  # the text tower's keys are ignored
    assert hf_config.model_type == "clip"
    out, ref = _forward(variables, pixels), torch_vision(model, pixels)
    close(out["image_embeds"], ref.pooler_output)  # get_image_features: projected pooled output
    close(out["last_hidden_state"], ref.last_hidden_state)
    # Without the projection the same checkpoint gives the bare tower.
    _, bare, _ = load(folder, with_projection=False)
    assert "visual_projection" not in bare["params"]
    close(_forward(bare, pixels)["pooled"], out["pooled"], atol=0)


def test_transformers4_vision_layout_loads(ckpts, pixels, tmp_path):
    # transformers 4 saved CLIPVisionModel under "vision_model." with a position_ids buffer.
    folder, model = ckpts["vision"]
    state = {f"vision_model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    state["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, variables, _ = load(tmp_path)
    close(_forward(variables, pixels)["last_hidden_state"],
          torch_vision(model, pixels).last_hidden_state)


def test_bfloat16_forward_stays_close(ckpts, pixels):
    folder, model = ckpts["full"]
    _, variables, _ = load(folder, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(variables))
    out, ref = _forward(variables, pixels), torch_vision(model, pixels)
    for ours, theirs in ((out["last_hidden_state"], ref.last_hidden_state),
                         (out["image_embeds"], ref.pooler_output)):
        assert ours.dtype == jnp.bfloat16
        theirs = theirs.numpy()
        close(ours, theirs, atol=BF16_REL * np.abs(theirs).max())


def test_every_weight_has_allowed_logical_axes():
    cfg = CLIPVisionConfig(**VISION)
    boxed = jax.eval_shape(CLIPVision(cfg).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        names = leaf.names
        assert set(names) <= ALLOWED_AXES and len(set(names)) == len(names), names
        assert len(names) == len(leaf.value.shape)
    assert {name for name, _ in LOGICAL_RULES} >= ALLOWED_AXES


def test_mesh_placement(ckpts, pixels):
    folder, model = ckpts["projection"]
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    _, variables, _ = load(folder, mesh=mesh)
    params = variables["params"]
    q = params["layers_0"]["self_attn"]["q_proj"]["kernel"]  # [embed, heads, kv]
    assert isinstance(q.sharding, NamedSharding) and q.sharding.mesh == mesh
    assert q.sharding.spec[:2] == ("fsdp", "tensor")
    fc1 = params["layers_0"]["mlp"]["fc1"]["kernel"]  # [embed, mlp]
    assert tuple(fc1.sharding.spec) == ("fsdp", "tensor")
    close(_forward(variables, pixels)["image_embeds"], torch_vision(model, pixels).image_embeds)


def _copy_without(folder: Path, dst: Path, drop: str = "", add: str = "") -> Path:
    state = load_file(folder / "model.safetensors")
    if drop:
        del state[drop]
    if add:
        state[add] = np.zeros(3, np.float32)
    save_file(state, dst / "model.safetensors")
    (dst / "config.json").write_text((folder / "config.json").read_text())
    return dst


def test_missing_and_unexpected_keys_are_named(ckpts, tmp_path):
    folder = ckpts["full"][0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    missing = _copy_without(folder, tmp_path / "a", drop="vision_model.encoder.layers.1.mlp.fc2.weight")
    with pytest.raises(ValueError, match=r"missing keys.*vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight"):
        load(missing)
    extra = _copy_without(folder, tmp_path / "b", add="vision_model.encoder.extra.weight")
    with pytest.raises(ValueError, match=r"unexpected keys.*vision_model\.encoder\.extra\.weight"):
        load(extra)


def test_projection_requested_but_absent_is_named(ckpts):
    with pytest.raises(ValueError, match=r"missing keys.*visual_projection\.weight"):
        load(ckpts["vision"][0], with_projection=True)


def test_config_that_does_not_fit_the_weights(ckpts, tmp_path):
    folder = ckpts["vision"][0]
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"shape mismatches.*encoder\.layers\.0\.mlp\.fc1\.weight"):
        load(tmp_path)


def test_bad_inputs_raise_clear_errors(ckpts):
    with pytest.raises(ValueError, match="not a CLIP checkpoint"):
        CLIPVisionConfig.from_hf(BertConfig())
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig(hidden_act="mish")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        CLIPVisionConfig(image_size=30, patch_size=8)
    module, variables, _ = load(ckpts["vision"][0])
    nchw = jnp.zeros((1, 3, 32, 32))
    with pytest.raises(ValueError, match="channels first"):
        jax.eval_shape(module.apply, variables, nchw)
    with pytest.raises(ValueError, match=r"images \[batch, 32, 32, 3\]"):
        jax.eval_shape(module.apply, variables, jnp.zeros((1, 64, 64, 3)))


def test_config_reads_both_hf_configs(ckpts):
    full = CLIPConfig(vision_config=dict(VISION, projection_dim=99), projection_dim=16)
    assert CLIPVisionConfig.from_hf(full).projection_dim == 16  # the full config's width wins
    vision = CLIPVisionConfig.from_hf(HFVisionConfig(**VISION), with_projection=False)
    assert vision == CLIPVisionConfig(**dict(VISION, projection_dim=None))
    assert vision.num_tokens == 17
    # OpenAI ViT-B/32 defaults give VLAP's 50-token prefix.
    assert CLIPVisionConfig().num_tokens == 50
