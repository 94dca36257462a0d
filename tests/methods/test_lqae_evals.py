"""LQAE's evaluations wired to a (tiny) model: every evaluation runs and writes its JSON."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from PIL import Image

from lqae_vlap.methods import lqae, lqae_evals
from lqae_vlap.core import sharding
from tests.helpers import find_tile, tiny_config, upsampled


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_mlm_dir):
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64)).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_mlm_dir).save_pretrained(path)
    return str(path)


def test_every_evaluation_runs_and_writes_json(tmp_path, tiny_mlm_dir, tiny_llama, capsys):
    config = tiny_config(tiny_mlm_dir)
    config.eval.evals = tuple(lqae_evals.EVALS)
    config.eval.llm_path = tiny_llama
    config.eval.max_images = 64
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    method = lqae.build(config, mesh)
    params = sharding.unbox(method.init_params(jax.random.PRNGKey(0)))
    scalars = method.evaluate(params, method.frozen, 7, str(tmp_path))
    for name in lqae_evals.EVALS:
        with open(tmp_path / f"eval_{name}_000007.json") as f:
            assert json.load(f)["step"] == 7
    assert scalars["fewshot/2way_1shot_chance"] == 0.5
    assert scalars["fewshot_llm/2way_1shot_chance"] == 0.5
    assert 0 <= scalars["fewshot/2way_1shot_accuracy"] <= 1
    assert 0 <= scalars["linear_probe/top1"] <= 1
    assert scalars["reconstruction/psnr_quantized"] > 0
    assert -1 <= scalars["reconstruction/ssim_quantized"] <= 1
    # The picture: each of the first num_images validation digits (8x8) repeated to 64x64
    # (nearest neighbour), beside its reconstructions and words.
    png = np.asarray(Image.open(tmp_path / "reconstructions_000007.png").convert("RGB"))
    source = method.evaluate.__self__.sources["validation"]
    for i in range(config.eval.num_images):
        tile = upsampled(np.asarray(source[i]["image"]))
        assert tile.shape == (64, 64, 3)
        assert find_tile(png, tile), f"validation image {i} is not in the picture at 64 px"
    assert scalars["reconstruction/ssim_filter_size"] == 7  # 8x8 images: the 11 window won't fit
    # The console: one short table per evaluation, no key=value dump.
    out = capsys.readouterr().out.splitlines()
    for name in lqae_evals.EVALS:
        head = [i for i, line in enumerate(out) if line.startswith(f"  {name} @ step 7 ")]
        assert len(head) == 1 and "value" in out[head[0]], (name, out)
    assert len(out) <= 20 * len(lqae_evals.EVALS) and max(map(len, out)) < 160, out
    assert os.listdir(tmp_path / "probe_features")  # features cached for the next call


def test_encode_words_equals_forward_indices(tiny_mlm_dir):
    config = tiny_config(tiny_mlm_dir)
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    method = lqae.build(config, mesh)
    params = sharding.unbox(method.init_params(jax.random.PRNGKey(0)))
    images = method.train_batches.batch_at(0)["image"]
    kw = method.loss_fn.keywords
    want = lqae.forward(params, method.frozen, images, jax.random.PRNGKey(0), model=kw["model"],
                        lm=kw["lm"], cfg=config, with_mlm=False)["q"].indices
    got = lqae_evals.encode_words(params, method.frozen, images, model=kw["model"], cfg=config)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_unknown_evaluation_is_named(tiny_mlm_dir):
    config = tiny_config(tiny_mlm_dir)
    config.eval.evals = ("reconstruction", "fid")
    with pytest.raises(ValueError, match="fid"):
        lqae.build(config, sharding.make_mesh({"data": -1}, jax.devices()[:1]))
