"""Token counting with the real MiniLM tokenizer, smoothing, and the saved marginal's round trip."""

import collections
import json
import math

import numpy as np
import pytest

from lqae_vlap.ops.word_frequency import (
    count_token_frequencies,
    load_marginal,
    save_marginal,
    smooth_frequencies,
)
from tests.helpers import minilm_tokenizer

CORPUS = [
    "A dog runs on the beach.",
    "Two dogs play with a red ball on the beach!",
    "an old man reading a newspaper",
    "The the THE, the: tokenization of unbelievable words",
    "",
    "a cat sleeping on a sofa next to a dog",
    "héllo wörld 123 4,567",
]


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer(eos_token=None)


def _brute_force(texts, tokenizer, vocab_size, specials=False):
    # One text at a time through tokenize() + convert_tokens_to_ids(), a different code path from
    # the batched __call__ the library uses.
    counter = collections.Counter()
    for text in texts:
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
        if specials:
            ids = [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]
        counter.update(ids)
    out = np.zeros(vocab_size, np.int64)
    for i, n in counter.items():
        out[i] = n
    return out


def test_counts_equal_brute_force(tokenizer):
    vocab = tokenizer.vocab_size + 7  # model rows may exceed the tokenizer's vocabulary
    counts = count_token_frequencies(CORPUS, tokenizer, vocab, batch_size=3)
    assert counts.dtype == np.int64 and counts.shape == (vocab,)
    np.testing.assert_array_equal(counts, _brute_force(CORPUS, tokenizer, vocab))
    the = tokenizer.convert_tokens_to_ids("the")
    assert counts[the] == 6  # "the" x2 in the beach captions, 4 casings in the 4th (lower-cased)
    assert counts[tokenizer.cls_token_id] == 0 and counts[tokenizer.sep_token_id] == 0
    # Batch size and input kind (a generator) do not change anything.
    np.testing.assert_array_equal(
        count_token_frequencies((t for t in CORPUS), tokenizer, vocab, batch_size=1000), counts
    )


def test_special_tokens_only_when_asked(tokenizer):
    vocab = tokenizer.vocab_size
    counts = count_token_frequencies(
        CORPUS, tokenizer, vocab, batch_size=2, add_special_tokens=True
    )
    np.testing.assert_array_equal(counts, _brute_force(CORPUS, tokenizer, vocab, specials=True))
    assert counts[tokenizer.cls_token_id] == len(CORPUS)


def test_count_errors(tokenizer):
    with pytest.raises(ValueError, match="vocab_size must be at least the tokenizer"):
        count_token_frequencies(CORPUS, tokenizer, 1000)
    with pytest.raises(TypeError, match="wrap it in a list"):
        count_token_frequencies("a single caption", tokenizer, tokenizer.vocab_size)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        count_token_frequencies(["ok", 3], tokenizer, tokenizer.vocab_size)


def test_smoothing_formula():
    counts = np.array([0, 3, 1, 0, 10], np.int64)
    for alpha, power in [(1.0, 1.0), (0.5, 0.5), (2.0, 1.7)]:
        p = smooth_frequencies(counts, alpha=alpha, power=power)
        w = [math.pow(n + alpha, power) for n in counts.tolist()]
        expected = np.array([x / math.fsum(w) for x in w])
        assert p.dtype == np.float64
        np.testing.assert_allclose(p, expected, rtol=1e-14, atol=0)
        assert abs(p.sum() - 1.0) < 1e-14
    # alpha = 0 keeps unseen words at exactly 0; power = 0 is uniform.
    p0 = smooth_frequencies(counts, alpha=0.0)
    np.testing.assert_allclose(p0, counts / counts.sum(), rtol=1e-15, atol=0)
    assert np.all(p0[counts == 0] == 0.0)
    np.testing.assert_allclose(smooth_frequencies(counts, power=0.0), np.full(5, 0.2), rtol=1e-15)


def test_smoothing_errors():
    with pytest.raises(ValueError, match="use alpha > 0"):
        smooth_frequencies(np.zeros(4), alpha=0.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        smooth_frequencies(np.array([1, -1, 2]))
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        smooth_frequencies(np.ones(3), alpha=-1.0)
    with pytest.raises(ValueError, match=r"\[V\] vector"):
        smooth_frequencies(np.ones((2, 2)))


META = {
    "tokenizer": "sentence-transformers/all-MiniLM-L6-v2",
    "dataset": "hand-written test corpus",
    "num_texts": 7,
    "smoothing": {"alpha": 1.0, "power": 1.0},
}


def test_save_load_round_trip(tmp_path):
    probs = smooth_frequencies(np.random.default_rng(0).integers(0, 50, 101))
    written = save_marginal(tmp_path / "run" / "word_marginal", probs, META)
    assert written == tmp_path / "run" / "word_marginal.npy"
    assert (tmp_path / "run" / "word_marginal.json").is_file()
    for path in (written, tmp_path / "run" / "word_marginal"):
        loaded, meta = load_marginal(path, vocab_size=101)
        np.testing.assert_array_equal(loaded, probs)
        assert meta == {**META, "vocab_size": 101, "format": "lqae_vlap.word_marginal/1"}


def test_length_mismatch_and_bad_files(tmp_path):
    probs = smooth_frequencies(np.arange(10))
    path = save_marginal(tmp_path / "m.npy", probs, META)
    with pytest.raises(ValueError, match="has 10 entries .* vocabulary has 12 words; recount"):
        load_marginal(path, vocab_size=12)
    # A vector and a sidecar that do not belong together.
    np.save(path, smooth_frequencies(np.arange(11)))
    with pytest.raises(ValueError, match="do not belong together"):
        load_marginal(path)
    with pytest.raises(FileNotFoundError, match="no word marginal"):
        load_marginal(tmp_path / "missing.npy")
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["vocab_size"] == 10


def test_save_errors(tmp_path):
    probs = smooth_frequencies(np.arange(5))
    with pytest.raises(ValueError, match=r"meta lacks \['num_texts', 'smoothing'\]"):
        save_marginal(tmp_path / "m", probs, {"tokenizer": "t", "dataset": "d"})
    with pytest.raises(ValueError, match="not 1"):
        save_marginal(tmp_path / "m", probs * 2, META)
    with pytest.raises(ValueError, match="must end in .npy"):
        save_marginal(tmp_path / "m.npz", probs, META)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_marginal(tmp_path / "m", probs, {**META, "extra": object()})


def test_word_marginal_of_each_source(tokenizer, tmp_path):
    """config.word_marginal.source: 'uniform', 'count' (counted now, each caption after a space,
    as it follows the prompt) and a saved file, each saying where it came from."""
    from lqae_vlap.ops.word_frequency import word_marginal

    vocab = tokenizer.vocab_size
    probs, where = word_marginal("uniform", vocab)
    assert where == "uniform" and probs.dtype == np.float32
    np.testing.assert_allclose(probs, 1.0 / vocab)
    probs, where = word_marginal("count", vocab, tokenizer=tokenizer, captions=CORPUS[:3],
                                 alpha=0.5, power=0.75)
    want = smooth_frequencies(count_token_frequencies([" " + c for c in CORPUS[:3]], tokenizer,
                                                      vocab), alpha=0.5, power=0.75)
    np.testing.assert_allclose(probs, want, rtol=1e-6)
    assert where == "counted over 3 training captions"
    with pytest.raises(ValueError, match="lists its captions"):
        word_marginal("count", vocab, tokenizer=tokenizer, captions=None)
    path = save_marginal(tmp_path / "m", want, meta={"tokenizer": "minilm", "dataset": "corpus",
                                                     "num_texts": 3, "smoothing": "test"})
    probs, where = word_marginal(str(path), vocab)
    np.testing.assert_allclose(probs, want, rtol=1e-6)
    assert where == f"{path} (corpus)"
