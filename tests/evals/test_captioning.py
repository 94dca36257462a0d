"""caption_metrics through pycocoevalcap: perfect captions, hand-computed BLEU/ROUGE-L/CIDEr-D
values, the Java-free fallback and the SPICE skip (never a download)."""

import importlib
import math

import numpy as np
import pytest

from lqae_vlap.evals import captioning
from lqae_vlap.evals.captioning import (PIP_REQUIREMENT, caption_metrics, references,
                                        simple_tokenize)
from tests.helpers import tiny_captions

try:
    importlib.import_module("pycocoevalcap")
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = e

JAVA_OK, JAVA_MSG = captioning.java_available()
needs_java = pytest.mark.skipif(not JAVA_OK, reason=f"Java unavailable: {JAVA_MSG}")


@pytest.fixture(autouse=True)
def _require_pycocoevalcap():
    if _IMPORT_ERROR is not None:
        pytest.fail(f"pycocoevalcap is not importable ({_IMPORT_ERROR}); it is a test requirement: "
                    f"pip install '{PIP_REQUIREMENT}' (or pip install -e .[test])")


# Two images with disjoint vocabularies: every n-gram has document frequency 1 of N = 2 images.
PERFECT_REFS = {1: ["A man rides a red horse, slowly."], 2: ["Two small dogs sleep on grass!"]}
PERFECT_PREDS = {1: "A man rides a red horse, slowly.", 2: "Two small dogs sleep on grass!"}
# By hand, CIDEr-D of a candidate equal to its single reference with all df = 1: each n-gram vector
# is tf * (log 2 - log 1), the clipped cosine of identical vectors is 1 for each n = 1..4 (both
# captions have >= 4 tokens), the length penalty is exp(0) = 1: score = 10 * mean_n(1) = 10.
CIDER_PERFECT = 10.0

# BLEU by hand. "the cat sat on the mat" vs "the cat sat on a mat": clipped precisions
# p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, equal lengths so BP = 1: BLEU-4 = (1/12)^(1/4).
# ROUGE-L: LCS "the cat sat on mat" = 5 tokens, P = R = 5/6, so F_beta = 5/6 for any beta.
KNOWN_PRED = {7: "The cat sat on the mat."}
KNOWN_REFS = {7: ["The cat sat on a mat."]}
KNOWN_BLEU4 = (1.0 / 12.0) ** 0.25
KNOWN_ROUGE = 5.0 / 6.0
# Brevity penalty: "the cat sat on" (c = 4) against refs of lengths 6 and 9; the closest is 6;
# every n-gram precision is 1 (all in the first ref): BLEU-n = exp(1 - 6/4) for all n.
BP_PRED = {3: "the cat sat on"}
BP_REFS = {3: ["the cat sat on the mat", "a cat was sitting on the red mat today"]}
BP_BLEU = math.exp(1.0 - 6.0 / 4.0)

TOL = 1e-6  # pycocoevalcap adds 1e-15 / 1e-9 smoothing to the precisions


def test_simple_tokenizer():
    assert simple_tokenize("A dog's ball,  on the GRASS.") == "a dog s ball on the grass"


def test_java_free_path_perfect_and_known_values():
    out = caption_metrics(PERFECT_PREDS, PERFECT_REFS, use_java=False)
    assert out["tokenizer"] == "simple"
    assert set(out["skipped"]) == {"METEOR", "SPICE"}
    assert all("needs Java" in r for r in out["skipped"].values())
    s = out["scores"]
    assert set(s) == {"BLEU-4", "ROUGE-L", "CIDEr"}
    assert s["BLEU-4"] == pytest.approx(1.0, abs=TOL)
    assert s["ROUGE-L"] == pytest.approx(1.0, abs=TOL)
    assert s["CIDEr"] == pytest.approx(CIDER_PERFECT, abs=TOL)

    known = caption_metrics(KNOWN_PRED, KNOWN_REFS, metrics=("BLEU-1", "BLEU-4", "ROUGE-L"),
                            use_java=False)["scores"]
    assert known["BLEU-1"] == pytest.approx(5.0 / 6.0, abs=TOL)
    assert known["BLEU-4"] == pytest.approx(KNOWN_BLEU4, abs=TOL)
    assert known["ROUGE-L"] == pytest.approx(KNOWN_ROUGE, abs=TOL)

    bp = caption_metrics(BP_PRED, BP_REFS, metrics=("BLEU-1", "BLEU-4"), use_java=False)["scores"]
    assert bp["BLEU-1"] == pytest.approx(BP_BLEU, abs=TOL)
    assert bp["BLEU-4"] == pytest.approx(BP_BLEU, abs=TOL)


def test_cider_uses_corpus_document_frequency():
    # A one-image corpus has idf = log(1) - log(1) = 0 for every n-gram: CIDEr-D = 0 even when
    # the caption is perfect (why CIDEr is only meaningful over a real evaluation set).
    out = caption_metrics({1: "a b c d"}, {1: ["a b c d"]}, metrics=("CIDEr",), use_java=False)
    assert out["scores"]["CIDEr"] == pytest.approx(0.0, abs=TOL)


@needs_java
def test_official_java_path_with_meteor():
    # One METEOR JVM for the whole file (it loads a paraphrase table: ~10-20 s).
    out = caption_metrics(PERFECT_PREDS, PERFECT_REFS,
                          metrics=("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"))
    assert out["tokenizer"] == "ptb" and out["skipped"] == {}
    s = out["scores"]
    assert s["BLEU-4"] == pytest.approx(1.0, abs=TOL)
    assert s["METEOR"] == pytest.approx(1.0, abs=TOL)  # identical: one chunk, no fragmentation
    assert s["ROUGE-L"] == pytest.approx(1.0, abs=TOL)
    assert s["CIDEr"] == pytest.approx(CIDER_PERFECT, abs=TOL)


@needs_java
def test_ptb_path_known_values_and_spice_skip(monkeypatch):
    monkeypatch.setattr(captioning, "spice_jars_missing", lambda: ["/x/stanford-corenlp-3.6.0.jar"])
    out = caption_metrics(KNOWN_PRED, KNOWN_REFS, metrics=("BLEU-4", "ROUGE-L", "SPICE"))
    assert out["tokenizer"] == "ptb"
    assert out["scores"]["BLEU-4"] == pytest.approx(KNOWN_BLEU4, abs=TOL)
    assert out["scores"]["ROUGE-L"] == pytest.approx(KNOWN_ROUGE, abs=TOL)
    assert "SPICE" not in out["scores"]
    assert "stanford-corenlp-3.6.0.jar" in out["skipped"]["SPICE"]


def test_spice_never_downloads_when_jars_are_missing(monkeypatch):
    if captioning.spice_jars_missing():
        # Spice() would fetch CoreNLP from the network; the skip must happen before it.
        import pycocoevalcap.spice.spice as spice_mod

        monkeypatch.setattr(spice_mod, "get_stanford_models",
                            lambda: pytest.fail("SPICE tried to download CoreNLP"))
        out = caption_metrics(KNOWN_PRED, KNOWN_REFS, metrics=("SPICE",), use_java=JAVA_OK)
        assert out["scores"] == {} and "SPICE" in out["skipped"]
    else:
        pytest.skip("CoreNLP jars are installed here; SPICE would run")


# NoCaps-like: six images in three domains, captions over one small vocabulary, so each domain's
# document frequencies differ from those of all six images.
DOMAIN_REFS = {i: tiny_captions(i, 3) for i in range(6)}
DOMAIN_PREDS = {i: tiny_captions(50 + i, 1)[0] if i % 2 else DOMAIN_REFS[i][1] for i in range(6)}
DOMAINS = {"in-domain": [0, 3], "near-domain": [1, 4], "out-domain": [2, 5]}


def _check_domains(out, tokenize, metrics):
    """Each domain's scores = pycocoevalcap's scorers run directly on that domain's images, as
    NoCaps' evaluation does (tokenizing is per caption, so the corpus is tokenized once)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    assert set(out["groups"]) == set(DOMAINS)
    gts = tokenize(DOMAIN_REFS)
    res = tokenize({k: [v] for k, v in DOMAIN_PREDS.items()})
    meteor = None
    if "METEOR" in metrics:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
    try:
        for domain, ids in DOMAINS.items():
            g, r = {k: gts[k] for k in ids}, {k: res[k] for k in ids}
            want = {"BLEU-4": Bleu(4).compute_score(g, r, verbose=0)[0][3],
                    "CIDEr": Cider().compute_score(g, r)[0]}
            if meteor is not None:
                want["METEOR"] = meteor.compute_score(g, r)[0]
            for m in metrics:
                assert out["groups"][domain][m] == pytest.approx(want[m], abs=1e-9), (domain, m)
    finally:
        if meteor is not None:
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
    # Scored as its own corpus: not the mean of the whole corpus's per-image CIDEr-D.
    _, per_image = Cider().compute_score(gts, res)
    whole_idf = float(np.mean(per_image[DOMAINS["in-domain"]]))
    assert abs(out["groups"]["in-domain"]["CIDEr"] - whole_idf) > 1e-3


def test_groups_are_scored_on_their_own_subset():
    metrics = ("BLEU-4", "CIDEr")
    out = caption_metrics(DOMAIN_PREDS, DOMAIN_REFS, metrics=metrics, use_java=False,
                          groups=DOMAINS)
    assert out["tokenizer"] == "simple"
    assert out["scores"] == caption_metrics(DOMAIN_PREDS, DOMAIN_REFS, metrics=metrics,
                                            use_java=False)["scores"]
    _check_domains(out, lambda c: {k: [simple_tokenize(x) for x in v] for k, v in c.items()},
                   metrics)
    with pytest.raises(ValueError, match="caption group 'x'"):
        caption_metrics(DOMAIN_PREDS, DOMAIN_REFS, use_java=False, groups={"x": [0, 9]})


@needs_java
def test_groups_with_the_ptb_tokenizer_and_meteor():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    metrics = ("BLEU-4", "METEOR", "CIDEr")
    out = caption_metrics(DOMAIN_PREDS, DOMAIN_REFS, metrics=metrics, groups=DOMAINS)
    assert out["tokenizer"] == "ptb"
    _check_domains(out, lambda c: PTBTokenizer().tokenize(
        {k: [{"caption": x} for x in v] for k, v in c.items()}), metrics)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same image ids"):
        caption_metrics({1: "a"}, {2: ["a"]}, use_java=False)
    with pytest.raises(ValueError, match="unknown caption metrics"):
        caption_metrics({1: "a"}, {1: ["a"]}, metrics=("BLEU",), use_java=False)
    with pytest.raises(ValueError, match="non-empty list"):
        caption_metrics({1: "a"}, {1: "a"}, use_java=False)
    with pytest.raises(ValueError, match="one string"):
        caption_metrics({1: ["a"]}, {1: ["a"]}, use_java=False)


def test_references_prefers_the_list_and_names_missing_keys():
    assert references({"references": ["a", "b"], "caption": "c"}) == ["a", "b"]
    assert references({"caption": "c"}) == ["c"]
    with pytest.raises(ValueError, match="'references'"):
        references({"image": None})


@needs_java
def test_ptb_tokenizer_prints_nothing_to_the_console(capfd):
    # pycocoevalcap lets Java write "PTBTokenizer tokenized N tokens at ..." to our stderr.
    caption_metrics(KNOWN_PRED, KNOWN_REFS, metrics=("BLEU-4",), use_java=True)
    out, err = capfd.readouterr()
    assert "PTBTokenizer" not in out + err, err


def test_child_stderr_is_reprinted_when_the_block_fails(capfd):
    import subprocess
    import sys

    with captioning._child_stderr_kept():
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('quiet\\n')"])
    with pytest.raises(RuntimeError):
        with captioning._child_stderr_kept():
            subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('loud\\n')"])
            raise RuntimeError("tokenizer failed")
    err = capfd.readouterr().err
    assert "quiet" not in err and "loud" in err
