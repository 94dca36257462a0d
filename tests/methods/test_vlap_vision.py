"""VLAP's vision towers (methods/vlap_vision.py): CLIP against transformers' PyTorch model, the
feature-cache identity of a local checkpoint, and the errors that name the config key."""

import jax
import numpy as np
import pytest
import torch
import transformers

from lqae_vlap.core import sharding
from lqae_vlap.data import clip_preprocess
from lqae_vlap.methods import vlap_vision
from tests.helpers import load_config


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
    with pytest.raises(ValueError, match="config.model.vision.kind='beit' is not known"):
        vlap_vision.load_vision(load_config("vlap_opt", **{"model.vision.kind": "beit"}), mesh)
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
