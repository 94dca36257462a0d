"""LQAE's evaluations wired to a (tiny) model: every evaluation runs and writes its JSON."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from lqae_vlap.methods import lqae, lqae_evals
from lqae_vlap.core import sharding
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_mlm_dir):
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64)).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_mlm_dir).save_pretrained(path)
    return str(path)


def test_every_evaluation_runs_and_writes_json(tmp_path, tiny_mlm_dir, tiny_llama):
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
    assert (tmp_path / "reconstructions_000007.png").exists()
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
