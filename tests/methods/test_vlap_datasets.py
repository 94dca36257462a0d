"""VLAP's captioning on NoCaps (overall and per domain) and retrieval on Flickr30k (the whole
test split, every similarity side by side) end to end on the demo config and the tiny Llama,
pointed at small files in the official layouts; a malformed file is one line from the CLI."""

import json
import math

import jax
import pytest

from lqae_vlap.core import sharding
from lqae_vlap.evals import captioning as captioning_lib
from lqae_vlap.methods import vlap
from tests.helpers import (demo_config, load_config, run_cli, tiny_captions, write_karpathy,
                           write_nocaps)


@pytest.fixture(scope="module")
def evaluated(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    nocaps_json, nocaps_images = write_nocaps(root / "nocaps")
    flickr_json, flickr_images = write_karpathy(root / "flickr30k")
    config = demo_config(tiny_llama_dir, **{
        "eval.evals": ("captioning", "retrieval"), "eval.batch_size": 4,
        "eval.captioning.source": "nocaps", "eval.captioning.annotations": str(nocaps_json),
        "eval.captioning.image_dir": str(nocaps_images), "eval.captioning.num_beams": (1,),
        "eval.captioning.max_new_tokens": 4, "eval.captioning.metrics": ("BLEU-4", "CIDEr"),
        "eval.retrieval.source": "flickr30k", "eval.retrieval.annotations": str(flickr_json),
        "eval.retrieval.image_dir": str(flickr_images), "eval.retrieval.max_pairs": 1000,
        "eval.retrieval.similarities": ("word_scores", "embedding", "caption_likelihood")})
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    method = vlap.build(config, mesh)
    params = jax.device_get(sharding.unbox(method.init_params(jax.random.PRNGKey(0))))
    params = jax.tree.map(lambda x: x + 0.3, params)
    workdir = root / "w"
    workdir.mkdir()
    scalars = method.evaluate(params, method.frozen, 3, str(workdir))
    return workdir, scalars, nocaps_json, method, params


def _scores_by_domain(workdir, step, raw):
    """The captions file's greedy captions scored by pycocoevalcap on each domain's images alone
    (and on all), with the NoCaps file's references."""
    refs = {im["id"]: [a["caption"] for a in raw["annotations"] if a["image_id"] == im["id"]]
            for im in raw["images"]}
    lines = (workdir / f"captions_greedy_{step:06d}.txt").read_text().splitlines()[1:]
    preds = {i: line.rsplit(" | ", 1)[0] or "." for i, line in enumerate(lines)}
    assert len(preds) == 6
    out = {"all": captioning_lib.caption_metrics(preds, refs, metrics=METRICS)["scores"]}
    for domain in ("in-domain", "near-domain", "out-domain"):
        ids = [im["id"] for im in raw["images"] if im["domain"] == domain]
        out[domain] = captioning_lib.caption_metrics(
            {i: preds[i] for i in ids}, {i: refs[i] for i in ids}, metrics=METRICS)["scores"]
    return out


METRICS = ("BLEU-4", "CIDEr")


def _check_captioning(workdir, step, scalars, raw):
    result = json.loads((workdir / f"eval_captioning_{step:06d}.json").read_text())
    assert result["protocol"]["dataset"] == "nocaps"
    assert result["protocol"]["split"] == "validation"
    assert result["protocol"]["domains"] == {"in-domain": 2, "near-domain": 2, "out-domain": 2}
    assert "its own" in result["protocol"]["domain_scores"]
    want = _scores_by_domain(workdir, step, raw)
    for m in METRICS:
        assert result["greedy"][m] == pytest.approx(want["all"][m], abs=1e-9)
        for domain in ("in-domain", "near-domain", "out-domain"):
            got = result["greedy"]["domains"][domain][m]
            assert got == pytest.approx(want[domain][m], abs=1e-9), (domain, m)
            assert scalars[f"captioning/greedy/domains/{domain}/{m}"] == pytest.approx(got)
    return want


def test_nocaps_captioning_reports_every_domain(evaluated):
    workdir, scalars, nocaps_json, method, params = evaluated
    raw = json.loads(nocaps_json.read_text())
    _check_captioning(workdir, 3, scalars, raw)  # the tiny random LLM's captions
    # Captions that score: every other image says one of its references, the rest something
    # else, so each domain's CIDEr-D is positive and differs from the others'.
    refs = [[a["caption"] for a in raw["annotations"] if a["image_id"] == i] for i in range(6)]
    fixed = iter([refs[i][1] if i % 2 == 0 else tiny_captions(50 + i, 1)[0] for i in range(6)])
    evaluator = method.evaluate.__self__
    evaluator.generate = lambda prefix, prompts, **kw: [next(fixed) for _ in prompts]
    try:
        scalars = method.evaluate(params, method.frozen, 4, str(workdir), names=("captioning",))
    finally:
        del evaluator.generate
    want = _check_captioning(workdir, 4, scalars, raw)
    cider = [want[d]["CIDEr"] for d in ("in-domain", "near-domain", "out-domain")]
    assert min(cider) > 0 and len(set(cider)) == 3, want


def test_flickr30k_retrieval_ranks_the_whole_split_by_every_similarity(evaluated):
    workdir, scalars = evaluated[:2]
    result = json.loads((workdir / "eval_retrieval_000003.json").read_text())
    protocol = result["protocol"]
    # 6 test images (the 2 train images left out) x 5 captions, one repeated word for word, in
    # one gallery although the demo config's gallery_size is 10.
    assert protocol == {"dataset": "flickr30k", "split": "test", "num_images": 6,
                        "split_images": 6, "num_captions": 30, "gallery": "full", "gallery_images": 6,
                        "similarities": ["word_scores", "embedding", "caption_likelihood"],
                        "ks": [1, 5]}
    # Chance of one gallery of 6 images with 5 captions each among 30.
    assert result["chance"]["i2t_R@1"] == pytest.approx(1 - math.comb(25, 1) / math.comb(30, 1))
    assert result["chance"]["t2i_R@1"] == pytest.approx(1 / 6)
    for sim in protocol["similarities"]:
        for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"):
            assert 0.0 <= scalars[f"retrieval/{sim}/{key}"] <= 1.0
            # Fractions of 6 images / 30 captions.
            n = 6 if key.startswith("i2t") else 30
            assert result[sim][key] * n == pytest.approx(round(result[sim][key] * n))


def test_paper_defaults_full_gallery_and_both_cheap_similarities():
    for name in ("vlap_opt", "vlap_t5"):
        r = load_config(name).eval.retrieval
        assert r.gallery_size == 0 and r.split == "test"
        assert tuple(r.similarities) == ("word_scores", "embedding")
        assert load_config(name).eval.captioning.source == ""


def test_a_malformed_or_missing_file_is_one_line_from_the_cli(tiny_llama_dir, tmp_path):
    broken = tmp_path / "nocaps_val_4500_captions.json"
    broken.write_text('{"images": [')
    workdir = tmp_path / "w"
    common = ["--config=configs/vlap_demo.py:1", f"--workdir={workdir}",
              f"--config.model.llm_path={tiny_llama_dir}", "--config.eval.evals=('captioning',)",
              "--config.eval.captioning.source=nocaps"]
    proc = run_cli(*common, f"--config.eval.captioning.annotations={broken}",
                   f"--config.eval.captioning.image_dir={tmp_path}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(broken) in lines[0] and "not valid JSON" in lines[0], lines[0]
    assert not workdir.exists()
