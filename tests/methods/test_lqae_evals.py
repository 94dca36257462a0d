"""LQAE's evaluations wired to a (tiny) model: every evaluation runs and writes its JSON."""

import json
import os
import types

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from PIL import Image

from lqae_vlap.methods import lqae, lqae_evals
from lqae_vlap.core import sharding
from lqae_vlap.models import vit
from lqae_vlap.ops import pixels
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


@pytest.fixture(scope="module")
def tiny_probe(tiny_mlm_dir):
    """(config, method, params, evaluator) of the tiny LQAE with only the linear probe."""
    config = tiny_config(tiny_mlm_dir, **{"eval.evals": ("linear_probe",),
                                          "eval.max_images": 32})
    method = lqae.build(config, sharding.make_mesh({"data": -1}, jax.devices()[:1]))
    params = sharding.unbox(method.init_params(jax.random.PRNGKey(0)))
    return config, method, params, method.evaluate.__self__


def test_released_probe_features_are_the_per_layer_token_means(tiny_probe, tiny_mlm_dir):
    """[every encoder block's output, every hidden state of transformers' PyTorch BERT over the
    image's words], each averaged over the tokens after the first in NumPy float64."""
    config, method, params, ctx = tiny_probe
    images = method.train_batches.batch_at(0)["image"][:4]
    got = np.asarray(ctx._probe_features(params, method.frozen, images))
    m = config.model
    encoder = vit.ViTEncoder(image_size=m.image_size, patch_size=m.patch_size,
                             width=m.encoder.width, depth=m.encoder.depth,
                             num_heads=m.encoder.num_heads, mlp_dim=m.encoder.mlp_dim)
    x = pixels.to_float(images, tuple(m.pixel_range))
    _, state = encoder.apply({"params": params["encoder"]}, x, mutable=["intermediates"])
    blocks = state["intermediates"]["transformer"]["block_outputs"]
    ids = np.asarray(lqae_evals.encode_words(params, method.frozen, images,
                                             model=method.loss_fn.keywords["model"], cfg=config))
    torch_lm = transformers.BertForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    with torch.no_grad():
        lm_states = torch_lm(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states
    states = [np.asarray(b, np.float64) for b in blocks] + [h.double().numpy() for h in lm_states]
    want = np.concatenate([s[:, 1:, :].mean(axis=1) for s in states], axis=1)
    assert len(blocks) == m.encoder.depth and len(lm_states) == 3  # a 2-layer LM: 3 states
    assert got.shape == (4, m.encoder.depth * m.encoder.width + 3 * 32) == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_linear_probe_runs_end_to_end_caches_and_records_its_protocol(tiny_probe, tmp_path,
                                                                      monkeypatch):
    config, method, params, ctx = tiny_probe
    calls = []
    backbone = ctx._probe_features

    def counted(*args):
        calls.append(1)
        return backbone(*args)

    monkeypatch.setattr(ctx, "_probe_features", counted)
    first = method.evaluate(params, method.frozen, 5, str(tmp_path))
    batches = 2 * -(-32 // config.eval.batch_size)  # train + validation
    assert len(calls) == batches
    second = method.evaluate(params, method.frozen, 5, str(tmp_path))
    assert len(calls) == batches  # the cache was read: the backbone did not run again
    assert first["linear_probe/top1"] == second["linear_probe/top1"]
    with open(tmp_path / "eval_linear_probe_000005.json") as f:
        r = json.load(f)
    p, proto = config.eval.probe, r["protocol"]
    assert proto["features"] == "released" and proto["optimizer"] == "lars"
    assert proto["width"] == config.model.encoder.depth * config.model.encoder.width + 3 * 32
    assert proto["layers"] == "ViT encoder blocks 1..1 + LM hidden states 0..2"
    assert (proto["epochs"], proto["lr_per_256"], proto["batch_size"]) == (p.epochs, p.lr, 32)
    assert proto["lr_peak"] == pytest.approx(p.lr * 32 / 256)
    assert proto["train_images"] == proto["validation_images"] == 32
    assert 0 <= r["top1"] <= 1 and 0 < r["chance"] <= 1
    # The single-layer probe is kept, cached under its own key.
    monkeypatch.setattr(config.eval.probe, "features", "lm_layer")
    method.evaluate(params, method.frozen, 5, str(tmp_path))
    with open(tmp_path / "eval_linear_probe_000005.json") as f:
        assert json.load(f)["protocol"]["width"] == 32
    assert len(os.listdir(tmp_path / "probe_features")) == 4


def test_unknown_probe_features_are_named(tiny_mlm_dir):
    config = tiny_config(tiny_mlm_dir, **{"eval.evals": ("linear_probe",),
                                          "eval.probe.features": "cls"})
    with pytest.raises(ValueError, match=r"config.eval.probe.features='cls'"):
        lqae.build(config, sharding.make_mesh({"data": -1}, jax.devices()[:1]))


def test_bad_fewshot_frozen_knob_stops_the_build_not_the_end_of_training(tiny_mlm_dir):
    config = tiny_config(tiny_mlm_dir, **{"eval.evals": ("fewshot_frozen",),
                                          "eval.fewshot_frozen.repeats": -1})
    with pytest.raises(ValueError, match=r"config.eval.fewshot_frozen.repeats=-1"):
        lqae.build(config, sharding.make_mesh({"data": -1}, jax.devices()[:1]))


def test_fewshot_frozen_writes_protocol_and_fits_the_context(tmp_path, tiny_mlm_dir,
                                                             tiny_llama_dir, capsys):
    """Frozen's protocol end to end on the tiny LQAE and a tiny Llama of 64 positions: 2-way
    1-shot = 3 images of 16 words do not fit, so the words are cut to fit."""
    config = tiny_config(tiny_mlm_dir)
    config.eval.evals = ("fewshot_frozen",)
    config.eval.llm_path = tiny_llama_dir
    config.eval.max_images = 64
    config.eval.fewshot_frozen.update(dict(episodes=3, max_new_tokens=3))
    # mini-ImageNet's test split, named through a synset file (its images are never read here).
    (tmp_path / "mini" / "images").mkdir(parents=True)
    (tmp_path / "mini" / "test.csv").write_text("filename,label\na.jpg,n02\nb.jpg,n01\n")
    (tmp_path / "names.txt").write_text("n01 house finch, linnet\nn02 malamute\n")
    config.eval.mini_imagenet_root = str(tmp_path / "mini")
    config.eval.mini_imagenet_label_names = str(tmp_path / "names.txt")
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    method = lqae.build(config, mesh)
    params = sharding.unbox(method.init_params(jax.random.PRNGKey(0)))
    scalars = method.evaluate(params, method.frozen, 5, str(tmp_path))
    with open(tmp_path / "eval_fewshot_frozen_000005.json") as f:
        result = json.load(f)
    p = result["protocol"]
    assert p["name"] == "frozen_open_ended" and p["names"] == "nonsense"
    assert (p["ways"], p["inner_shots"], p["repeats"], p["episodes"]) == ([2], [1], 0, 3)
    assert p["task_induction"] and p["prompt_policy"] == "truncate_words"
    assert p["context_length"] == 64 and p["nonsense_words"][:2] == ["dax", "blicket"]
    cell = result["2way_1shot"]
    assert cell["chance"] == 0.5 and 0 <= cell["accuracy"] <= 1
    assert 0 <= cell["ranking_accuracy"] <= 1 and cell["num_episodes"] == 3
    assert cell["words_per_image_full"] == 16 and 1 <= cell["words_per_image"] < 16
    assert cell["prompt_tokens_max"] <= 64 - 3
    assert all(e["answer"] in p["nonsense_words"] for e in cell["examples"])
    assert scalars["fewshot_frozen/2way_1shot/accuracy"] == cell["accuracy"]
    out = capsys.readouterr().out
    assert "fewshot_frozen @ step 5" in out and "2way 1shot" in out and "words/image" in out
    ctx = method.evaluate.__self__
    assert ctx.sources["mini_imagenet"].class_names == ("house finch", "malamute")
    ctx.cfg.eval.fewshot_frozen.ranking = False  # exact match only: the same generations
    method.evaluate(params, method.frozen, 7, str(tmp_path))
    with open(tmp_path / "eval_fewshot_frozen_000007.json") as f:
        plain = json.load(f)["2way_1shot"]
    assert "ranking_accuracy" not in plain and plain["accuracy"] == cell["accuracy"]
    ctx.cfg.eval.fewshot_frozen.prompt_policy = "error"  # the same LLM and words
    with pytest.raises(ValueError, match=r"exceeds the \d+ the LLM's context.*truncate_words"):
        method.evaluate(params, method.frozen, 6, str(tmp_path))


def test_causal_lm_generate_equals_transformers_greedy(tiny_llama_dir):
    """CausalLM.generate (one left-padded batch through generate.py) against transformers'
    generate(do_sample=False) on each prompt alone."""
    llm = lqae_evals.CausalLM(tiny_llama_dir)
    assert llm.context_length == 64
    prompts = ["a cat This is a dax.\nQ: What is this? A: This is a", "red sky"]
    got = llm.generate(prompts, 4)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    for prompt, text in zip(prompts, got):
        ids = torch.as_tensor([llm.tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 do_sample=False, pad_token_id=llm.pad_id,
                                 eos_token_id=llm.eos_id)[0, ids.shape[1]:].tolist()
        if llm.eos_id in out:
            out = out[:out.index(llm.eos_id)]
        assert text == llm.tokenizer.decode(out, skip_special_tokens=True)
    assert llm.count_tokens("red sky") == len(llm.tokenizer("red sky")["input_ids"])


def test_fewshot_frozen_real_names_need_more_than_wordnet_ids():
    """names='real' on classes still named by WordNet ids stops with the config key to set."""
    cfg = ml_collections.ConfigDict(dict(eval=dict(llm_path="x", fewshot_frozen=dict(
        split="mini_imagenet", names="real"))))
    ctx = types.SimpleNamespace(
        cfg=cfg, causal=object(), sources={"mini_imagenet": types.SimpleNamespace(
            class_names=("n01532829", "n02110063"))},
        split_words=lambda split: (np.zeros((2, 4), np.int32), np.array([0, 1])))
    with pytest.raises(ValueError, match="WordNet ids.*eval.mini_imagenet_label_names"):
        lqae_evals.fewshot_frozen(ctx, 0, "")
