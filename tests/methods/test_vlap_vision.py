"""VLAP's vision towers (methods/vlap_vision.py): CLIP and BEiT against transformers' PyTorch
models, BEiT in a tiny VLAP training step, the feature-cache identity (a local checkpoint's
weights; the tower's kind), the configs' vision-encoder names, and the errors that name the
config key."""

import math

import jax
import numpy as np
import pytest
import torch
import transformers

from lqae_vlap.core import sharding
from lqae_vlap.data import clip_preprocess
from lqae_vlap.data import feature_cache as fc
from lqae_vlap.methods import vlap, vlap_vision
from tests.helpers import demo_config, load_config, rerandomise


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=16)
    transformers.CLIPVisionModel(cfg).eval().save_pretrained(path)
    return str(path)


def test_clip_tower_matches_pytorch_and_keys_the_cache_on_its_weights(tiny_clip_dir):
    config = load_config("vlap_opt", **{"model.vision.path": tiny_clip_dir})
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    tower = vlap_vision.load_vision(config, mesh)
    assert (tower.width, tower.image_size) == (32, 32)
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    x = np.stack([tower.host_image(im) for im in images])  # resize + centre crop on the host
    assert x.shape == (2, 32, 32, 3) and x.dtype == np.uint8
    got = np.asarray(jax.jit(tower.encode)(tower.frozen, x))
    hf = transformers.CLIPVisionModel.from_pretrained(tiny_clip_dir).eval()
    pixels = np.asarray(clip_preprocess.clip_normalize(x), np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        want = hf(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # float32 parity, ~1e-6 seen
    vision = tower.cache_parts["vision"]
    assert vision["weights"][0]["name"] == "model.safetensors"  # a local folder: its weights
    assert vision["output"] == "last_hidden_state" and vision["dtype"] == "float32"
    assert tower.cache_parts["preprocess"]["size"] == 32


def test_tower_errors_name_the_key(tiny_clip_dir, tmp_path):
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    with pytest.raises(ValueError, match="config.model.vision.kind='vit' is not known"):
        vlap_vision.load_vision(load_config("vlap_opt", **{"model.vision.kind": "vit"}), mesh)
    with pytest.raises(ValueError, match="kind='beit' but .* holds a 'clip'-family model"):
        vlap_vision.load_vision(load_config("vlap_opt:opt-1.3b,beit-base",
                                            **{"model.vision.path": tiny_clip_dir}), mesh)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kind='clip' but .* holds a 'roberta'-family model"):
        vlap_vision.load_vision(load_config("vlap_opt", **{"model.vision.path": str(tmp_path)}),
                                mesh)
    with pytest.raises(ValueError, match="config.model.vision.arch"):
        vlap_vision.load_vision(load_config("vlap_opt", **{"model.vision.path": "org/none",
                                                           "model.vision.arch": {}}),
                                mesh, abstract=True)


# --- BEiT ---------------------------------------------------------------------------------------

TINY_BEIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=8, vocab_size=16)


@pytest.fixture(scope="module")
def tiny_beit_dir(tmp_path_factory):
    """A BeitForMaskedImageModeling in microsoft/beit-base-patch16-224-pt22k's layout (shared
    relative position bias, mask token), weights re-drawn so layer scale and the bias matter."""
    path = tmp_path_factory.mktemp("tiny_beit")
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(**TINY_BEIT, use_shared_relative_position_bias=True,
                                  use_mask_token=True)
    rerandomise(transformers.BeitForMaskedImageModeling(cfg)).save_pretrained(path)
    return str(path)


def test_beit_tower_matches_pytorch(tiny_beit_dir):
    config = load_config("vlap_opt:opt-1.3b,beit-base", **{"model.vision.path": tiny_beit_dir})
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    tower = vlap_vision.load_vision(config, mesh)
    assert (tower.width, tower.image_size) == (32, 32)
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    x = np.stack([tower.host_image(im) for im in images])  # square resize, no crop
    assert x.shape == (2, 32, 32, 3) and x.dtype == np.uint8
    got = np.asarray(jax.jit(tower.encode)(tower.frozen, x))
    assert got.shape == (2, 1 + 16, 32)  # every token, CLS included
    # The authors' reference: BeitModel.from_pretrained on the MIM checkpoint, its processor.
    hf = transformers.BeitModel.from_pretrained(tiny_beit_dir).eval()
    processor = transformers.models.beit.image_processing_pil_beit.BeitImageProcessorPil(
        size={"height": 32, "width": 32}, resample=2)  # pt22k's preprocessor_config: bilinear
    pixels = processor(images=list(images), return_tensors="np")["pixel_values"]
    with torch.no_grad():
        want = hf(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # float32 parity
    vision = tower.cache_parts["vision"]
    assert vision["kind"] == "beit" and vision["weights"][0]["name"] == "model.safetensors"
    assert tower.cache_parts["preprocess"] == {
        "name": "beit_resize", "size": 32, "resample": "bilinear", "mean": [0.5] * 3,
        "std": [0.5] * 3}


def test_beit_tower_in_a_tiny_vlap(tiny_beit_dir, tiny_llama_dir):
    """The demo's VLAP (tiny Llama, digits) with the BEiT tower: 17 tokens of width 32 -> the
    Dense; the loss is finite and its gradient reaches the Dense through the BEiT tokens."""
    config = demo_config(tiny_llama_dir, **{"model.vision": dict(
        kind="beit", path=tiny_beit_dir, dtype="float32"), "data.batch_size": 4})
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    method = vlap.build(config, mesh)
    params = sharding.unbox(method.init_params(jax.random.PRNGKey(0)))
    assert params["Dense_0"]["kernel"].shape == (32, 32)  # BEiT width -> the LLM's
    batch = method.train_batches.batch_at(0)
    assert batch["image"].shape == (4, 32, 32, 3)  # at the tower's image size
    (loss, _), grads = jax.jit(jax.value_and_grad(method.loss_fn, has_aux=True))(
        params, method.frozen, batch, jax.random.PRNGKey(0))
    assert math.isfinite(float(loss))
    assert float(np.abs(np.asarray(grads["Dense_0"]["kernel"])).max()) > 0


TINY_CLIP_ARCH = dict(model_type="clip_vision_model", hidden_size=8, intermediate_size=16,
                      num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16)
TINY_BEIT_ARCH = dict(model_type="beit", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, image_size=32, patch_size=16,
                      use_shared_relative_position_bias=True, use_mask_token=True)


def test_cache_key_differs_by_tower():
    """Same path, data, dtype and preprocessing size: CLIP's and BEiT's features never share a
    key, because the tower's kind is part of it (and so are their preprocessings)."""
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    parts = {}
    for kind, name, arch in (("clip", "clip-vit-b32", TINY_CLIP_ARCH),
                             ("beit", "beit-base", TINY_BEIT_ARCH)):
        config = load_config(f"vlap_opt:opt-1.3b,{name}", **{
            "model.vision.path": "nonexistent-org/one-name", "model.vision.arch": arch})
        tower = vlap_vision.load_vision(config, mesh, abstract=True)
        assert tower.cache_parts["vision"]["config"]["kind"] == kind
        parts[kind] = tower.cache_parts
    keys = {k: fc.cache_key(**p, dataset="cc3m", split="train", num_examples=10, dtype="float16")
            for k, p in parts.items()}
    assert keys["clip"] != keys["beit"]
    # The vision identity alone already separates them (not only the preprocessing).
    same_pre = {k: fc.cache_key(vision=p["vision"], preprocess={}, dataset="cc3m", split="train",
                                num_examples=10, dtype="float16") for k, p in parts.items()}
    assert same_pre["clip"] != same_pre["beit"]


def test_configs_take_the_vision_encoder_by_name():
    clip, beit = load_config("vlap_opt:opt-1.3b"), load_config("vlap_opt:opt-1.3b,beit-base")
    assert (clip.model.vision.kind, clip.model.vision.path) == (
        "clip", "openai/clip-vit-base-patch32")
    assert (beit.model.vision.kind, beit.model.vision.path) == (
        "beit", "microsoft/beit-base-patch16-224-pt22k")
    assert beit.model.vision.arch.model_type == "beit"
    assert beit.model.llm_path == clip.model.llm_path == "facebook/opt-1.3b"
    t5 = load_config("vlap_t5:t5-base,beit-base")
    assert (t5.model.llm_family, t5.model.llm_path, t5.model.vision.kind) == ("t5", "t5-base",
                                                                            "beit")
    assert load_config("vlap_t5:google/flan-t5-base").model.vision.kind == "clip"
    with pytest.raises(ValueError, match="vision encoder 'beit' .* use one of clip-vit-b32, "
                                         "beit-base"):
        load_config("vlap_opt:opt-1.3b,beit")


def test_beit_base_preset_is_the_pt22k_architecture():
    """Plan mode's BEiT-Base (no weights, no network) has transformers' BeitModel's parameters
    for that config (no pooler, as BeitForMaskedImageModeling) and VLAP's 197 tokens."""
    config = load_config("vlap_opt:opt-1.3b,beit-base")
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    tower = vlap_vision.load_vision(config, mesh, abstract=True)
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(tower.frozen))
    arch = {k: v for k, v in config.model.vision.arch.items() if k != "model_type"}
    with torch.device("meta"):
        hf = transformers.BeitForMaskedImageModeling(transformers.BeitConfig(**arch)).beit
    assert ours == sum(p.numel() for p in hf.parameters()) == 85_664_592
    assert (tower.width, tower.image_size) == (768, 224)
    tokens = jax.eval_shape(tower.encode, tower.frozen,
                            jax.ShapeDtypeStruct((1, 224, 224, 3), np.uint8))
    assert tokens.shape == (1, 197, 768)
