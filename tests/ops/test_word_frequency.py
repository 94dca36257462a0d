"""Token counting with the real MiniLM tokenizer, smoothing, and the saved marginal's round trip."""

import collections
import json
import math

import numpy as np
import pytest

from lqae_vlap.ops.word_frequency import (
    count_token_frequencies,
    load_marginal,
    marginal_key,
    save_marginal,
    smooth_frequencies,
    tokenizer_identity,
    word_marginal,
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
    assert written == str(tmp_path / "run" / "word_marginal.npy")
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


def test_count_by_hand(tokenizer):
    """Two captions counted by hand: ' a dog' and ' a dog and a cat' (lower-cased WordPiece)."""
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("a", "dog", "and", "cat")}
    counts = count_token_frequencies([" a dog", " A dog and a CAT"], tokenizer,
                                     tokenizer.vocab_size)
    want = np.zeros(tokenizer.vocab_size, np.int64)
    for word, n in {"a": 3, "dog": 2, "and": 1, "cat": 1}.items():
        want[ids[word]] = n
    np.testing.assert_array_equal(counts, want)


class _PythonCallOnly:
    """A tokenizer seen only through its Python __call__ (no Rust backend to call directly)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, texts, add_special_tokens):
        return self.tok(texts, add_special_tokens=add_special_tokens)


def _byte_level_bpe():
    """A tiny byte-level BPE (the kind OPT's GPT-2 tokenizer is), trained here on CORPUS."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@pytest.mark.parametrize("kind", ["wordpiece", "byte_level_bpe"])
def test_fast_backend_counts_equal_the_python_call(tokenizer, kind):
    """The counter calls the Rust backend's encode_batch_fast directly; the ids are those of the
    tokenizer's own batched __call__ (what training tokenises captions with)."""
    tok = tokenizer if kind == "wordpiece" else _byte_level_bpe()
    texts = [" " + c for c in CORPUS] * 3
    vocab = len(tok)
    fast = count_token_frequencies(texts, tok, vocab, batch_size=4)
    slow = count_token_frequencies(texts, _PythonCallOnly(tok), vocab, batch_size=4)
    np.testing.assert_array_equal(fast, slow)
    assert fast.sum() > len(texts)  # the captions really were tokenised
    # A backend left truncating by an earlier call is not trusted: the Python call resets it.
    tok(texts[:1], truncation=True, max_length=2)
    tok.backend_tokenizer.enable_truncation(2)
    np.testing.assert_array_equal(count_token_frequencies(texts, tok, vocab), fast)


def test_tokenizer_identity_follows_the_ids(tokenizer, tmp_path):
    same = minilm_tokenizer(eos_token=None)
    a, b = tokenizer_identity(tokenizer, "one/path"), tokenizer_identity(same, "another/path")
    assert a["sha256"] == b["sha256"] and a["name"] == "one/path"
    other = minilm_tokenizer(eos_token=None)
    other.add_tokens(["blicket"])  # one more word: other ids, another identity
    assert tokenizer_identity(other)["sha256"] != a["sha256"]
    assert tokenizer_identity(_byte_level_bpe())["sha256"] != a["sha256"]


DATASET = {"name": "cc3m", "split": "train", "path": "/data/cc3m", "num_texts": 3,
           "label": "CC3M train"}
LABEL = "OPT tokenizer (facebook/opt-1.3b)"


def _frequency(tok, captions, cache, **kw):
    args = dict(tokenizer=tok, captions=captions, dataset=DATASET, tokenizer_name="minilm",
                tokenizer_label=LABEL, cache_dir=str(cache))
    return word_marginal("frequency", tok.vocab_size, **{**args, **kw})


def test_frequency_is_counted_once_saved_and_reused(tokenizer, tmp_path):
    vocab, calls = tokenizer.vocab_size, []

    def captions():
        calls.append(1)
        return CORPUS[:3]

    probs, line = _frequency(tokenizer, captions, tmp_path)
    want = smooth_frequencies(count_token_frequencies([" " + c for c in CORPUS[:3]], tokenizer,
                                                      vocab))
    np.testing.assert_allclose(probs, want, rtol=1e-6)
    assert probs.dtype == np.float32 and len(calls) == 1
    saved = sorted(tmp_path.iterdir())
    assert [p.suffix for p in saved] == [".json", ".npy"]
    npy = saved[1]
    assert npy.name.startswith("cc3m-train-minilm-v30522-")
    # The start-up line: what was counted, with which tokenizer, how many words, where it is.
    assert line.startswith(f"CC3M train, {LABEL}, 30,522 words, counted over 3 captions in ")
    assert line.endswith(f" s, saved at {npy}") and "\n" not in line
    # Provenance: data, split, tokenizer, smoothing, the key it is found by.
    probs_saved, meta = load_marginal(npy, vocab_size=vocab)
    np.testing.assert_array_equal(probs_saved, want)
    ident = tokenizer_identity(tokenizer, "minilm")
    assert meta["key"] == marginal_key(DATASET, ident, vocab, 1.0, 1.0)
    assert meta["dataset"]["name"] == "cc3m" and meta["dataset"]["split"] == "train"
    assert meta["tokenizer"] == ident and meta["smoothing"] == {"alpha": 1.0, "power": 1.0}
    assert meta["num_texts"] == 3 and meta["vocab_size"] == vocab

    # The next run finds it: nothing counted, nothing rewritten.
    mtime = npy.stat().st_mtime_ns
    again, line2 = _frequency(tokenizer, captions, tmp_path)
    np.testing.assert_array_equal(again, probs)
    assert len(calls) == 1 and npy.stat().st_mtime_ns == mtime
    assert line2 == (f"CC3M train, {LABEL}, 30,522 words, loaded from {npy} "
                     f"(counted {meta['counted_at']})")

    # A damaged file is counted again and rewritten, not a failed run.
    npy.write_bytes(b"not a .npy")
    again, _ = _frequency(tokenizer, captions, tmp_path)
    np.testing.assert_array_equal(again, probs)
    assert len(calls) == 2 and np.array_equal(load_marginal(npy)[0], want)

    # Another smoothing, another number of captions or another tokenizer: counted anew, saved
    # beside it.
    _frequency(tokenizer, captions, tmp_path, alpha=0.5)
    _frequency(tokenizer, captions, tmp_path, dataset={**DATASET, "num_texts": 4})
    other = minilm_tokenizer(eos_token=None)
    other.add_tokens(["blicket"])
    _frequency(other, captions, tmp_path)
    assert len(calls) == 5 and len(list(tmp_path.glob("*.npy"))) == 4


def test_frequency_without_captions_says_how_to_provide_them(tokenizer, tmp_path):
    for captions in (None, lambda: None):
        with pytest.raises(ValueError) as e:
            _frequency(tokenizer, captions, tmp_path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("config.word_marginal.source='frequency'")
        for way in ("--config.word_marginal.source=/path/to/marginal.npy",
                    "--config.data.train_path", "--config.word_marginal.source=uniform"):
            assert way in msg
    assert list(tmp_path.iterdir()) == []
    # An unwritable cache costs the file, not the run, and the line says so.
    blocked = tmp_path / "file"
    blocked.write_text("")
    probs, line = _frequency(tokenizer, CORPUS[:3], blocked / "cache")
    assert "NOT saved at" in line and "word_marginal.cache_dir" in line
    assert abs(float(probs.sum()) - 1.0) < 1e-5


def test_word_marginal_uniform_count_and_path(tokenizer, tmp_path):
    vocab = tokenizer.vocab_size
    probs, line = word_marginal("uniform", vocab)
    assert probs.dtype == np.float32 and line.startswith("uniform over 30,522 words")
    np.testing.assert_allclose(probs, 1.0 / vocab)
    probs, line = word_marginal("count", vocab, tokenizer=tokenizer, captions=CORPUS[:3],
                                dataset=DATASET, tokenizer_label=LABEL, alpha=0.5, power=0.75)
    want = smooth_frequencies(count_token_frequencies([" " + c for c in CORPUS[:3]], tokenizer,
                                                      vocab), alpha=0.5, power=0.75)
    np.testing.assert_allclose(probs, want, rtol=1e-6)
    assert line.startswith(f"CC3M train, {LABEL}, 30,522 words, counted over 3 captions in ")
    assert line.endswith("(not saved: word_marginal.source='count')")
    assert list(tmp_path.iterdir()) == []
    path = save_marginal(tmp_path / "m", want, meta={"tokenizer": "minilm", "dataset": "corpus",
                                                     "num_texts": 3, "smoothing": "test"})
    probs, line = word_marginal(str(path), vocab)
    np.testing.assert_allclose(probs, want, rtol=1e-6)
    assert line == f"corpus, tokenizer minilm, 30,522 words, loaded from {path}"
    with pytest.raises(ValueError, match="source='frequncy' is not known"):
        word_marginal("frequncy", vocab)
    with pytest.raises(FileNotFoundError, match="no word marginal at"):
        word_marginal(str(tmp_path / "missing.npy"), vocab)
