"""Few-shot protocol: episodes, image text, prompts, the LLM class scorer, the prototype route, and
run_fewshot's shuffled control.

References: score_classes against a brute-force sum of next-token log-probabilities, token by token
in float64 NumPy, from one unpadded, unmasked, unbatched forward per class of a tiny random Llama
(causality: position t sees only ids[:t + 1]), atol 1e-4 (float32 model); encoder_features
against a NumPy masked mean of MaskedLM's hidden states, 1e-5;
prompts against hand-written strings.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqae_vlap.evals import fewshot
from lqae_vlap.models.llama import LlamaConfig, LlamaForCausalLM
from lqae_vlap.models.roberta import EncoderLMConfig, MaskedLM
from tests.helpers import minilm_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer(eos_token=None)


def random_params(module, std, seed):
    """Random weights from the param shapes (eval_shape: no compiled init). Norm scales are 1 and
    biases 0, as at init; every other array ~ N(0, std)."""
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0),
                                          jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(seed)

    def make(path, s):
        name = path[-1].key
        if name in ("scale", "bias"):
            return (jnp.ones if name == "scale" else jnp.zeros)(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64, pad_token_id=0)
    module = LlamaForCausalLM(cfg)
    # std 0.5 (not HF's 0.02) so that log-probabilities differ visibly between tokens.
    return module, random_params(module, std=0.5, seed=0)


@pytest.fixture(scope="module")
def tiny_encoder():
    cfg = EncoderLMConfig(model_type="roberta", vocab_size=200, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=40)
    module = MaskedLM(cfg)
    return module, random_params(module, std=0.02, seed=1)


def test_sample_episodes_deterministic_disjoint_and_balanced():
    labels = np.repeat(np.arange(6), 7)
    labels[:3] = 5  # class 0 keeps 4 images: too few for k_shot + n_query = 5
    eps = fewshot.sample_episodes(labels, n_way=3, k_shot=2, n_query=3, num_episodes=30, seed=7)
    again = fewshot.sample_episodes(labels, 3, 2, 3, 30, seed=7)
    other = fewshot.sample_episodes(labels, 3, 2, 3, 30, seed=8)
    for a, b in zip(eps, again):
        for f in ("classes", "support", "query", "query_labels"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert any(not np.array_equal(a.support, b.support) for a, b in zip(eps, other))
    orders = set()
    for ep in eps:
        assert ep.support.shape == (3, 2) and ep.query.shape == (9,)
        assert len(set(ep.classes)) == 3 and 0 not in ep.classes
        assert not set(ep.support.ravel()) & set(ep.query)
        assert len(set(ep.support.ravel()) | set(ep.query)) == 15
        for i, c in enumerate(ep.classes):
            assert np.all(labels[ep.support[i]] == c)
        np.testing.assert_array_equal(labels[ep.query], ep.classes[ep.query_labels])
        np.testing.assert_array_equal(np.bincount(ep.query_labels), [3, 3, 3])
        orders.add(tuple(ep.classes))
    assert len(orders) > 10  # classes and their order vary
    with pytest.raises(ValueError, match="lower n_way"):
        fewshot.sample_episodes(labels, n_way=6, k_shot=2, n_query=3, num_episodes=1, seed=0)
    with pytest.raises(ValueError, match="k_shot"):
        fewshot.sample_episodes(labels, n_way=2, k_shot=0, n_query=1, num_episodes=1, seed=0)


def test_image_text_strips_special_tokens(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["[CLS]", "the", "cat", "##s", "[MASK]", "sat", "[SEP]",
                                           "[PAD]"])
    assert fewshot.image_text(ids, tokenizer) == "the cats sat"
    assert fewshot.image_text(np.array(ids), tokenizer, mode="tokens") == "the cat ##s sat"
    with pytest.raises(ValueError, match="mode"):
        fewshot.image_text(ids, tokenizer, mode="words")


def test_build_prompt_exact():
    support = [["red sky", "blue sea"], ["old dog", "a cat"]]
    prompt = fewshot.build_prompt(support, ["sunset", "pet"], "the dog")
    assert prompt == ("Input: red sky, output: sunset\n"
                      "Input: old dog, output: pet\n"
                      "Input: blue sea, output: sunset\n"
                      "Input: a cat, output: pet\n"
                      "Input: the dog, output:")
    custom = fewshot.PromptTemplate(example="{text} => {label}", query="{text} =>", separator=" | ",
                                    header="Classify.")
    assert fewshot.build_prompt([["a"], ["b"]], ["x", "y"], "c", custom) == \
        "Classify. | a => x | b => y | c =>"
    with pytest.raises(ValueError, match="same number"):
        fewshot.build_prompt([["a"], ["b", "c"]], ["x", "y"], "q")
    with pytest.raises(ValueError, match="one row of texts per class"):
        fewshot.build_prompt([["a"]], ["x", "y"], "q")


def test_score_classes_matches_token_by_token_sum(tiny_llama):
    module, params = tiny_llama
    prompt = [1, 17, 5, 33, 9, 41, 12]
    classes = [[7], [20, 3], [45, 11, 29], [20, 8]]  # different lengths, a shared first token
    fn = fewshot.causal_lm_logprob_fn(module, params)
    got = fewshot.score_classes(fn, prompt, classes, pad_id=0, pad_multiple=8)

    apply = jax.jit(lambda ids: module.apply(params, ids)["logits"])

    def brute(c):
        # One unpadded, unmasked forward of prompt + class; causality makes the logits at position
        # t those of the prefix ids[:t + 1]. Log-softmax and the sum in float64, token by token.
        logits = np.asarray(apply(jnp.asarray([prompt + c], jnp.int32))[0], np.float64)
        total = 0.0
        for j, tok in enumerate(c):
            row = logits[len(prompt) + j - 1]
            total += row[tok] - row.max() - np.log(np.exp(row - row.max()).sum())
        return total

    want = np.array([brute(c) for c in classes])
    assert np.ptp(want) > 1.0  # the scores discriminate, so a wrong index would show
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="token per class"):
        fewshot.score_classes(fn, prompt, [[3], []])


def test_prototype_classify_hand_case():
    s = np.array([[1.0, 0.1], [3.0, -0.2], [0.0, 1.0], [0.2, 2.0]])
    y = np.array([4, 4, 9, 9])
    q = np.array([[5.0, 1.0], [0.5, 3.0], [1.0, 1.1]])
    # Class means of unit vectors point near (1, 0) and (0.05, 1): the third query is nearer 9.
    np.testing.assert_array_equal(fewshot.prototype_classify(s, y, q), [4, 9, 9])
    with pytest.raises(ValueError, match="support"):
        fewshot.prototype_classify(s, y[:3], q)


def test_encoder_features_masked_mean(tiny_encoder):
    module, params = tiny_encoder
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, size=(60, 8))
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    mask[55, 1:] = 0
    # 60 rows in batches of 50: the last batch is padded (same compiled shape as the run below).
    feats = fewshot.encoder_features(module, params, ids, attention_mask=mask, batch_size=50)
    pos = np.arange(8) + module.config.position_offset
    h = np.asarray(module.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                position_ids=jnp.asarray(pos), with_lm_head=False)
                   ["last_hidden_state"], np.float64)
    want = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(feats, want, atol=1e-5)
    # An inner layer: transformers' hidden_states indexing (0 = embeddings, 1 = after layer 1).
    states = module.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                          position_ids=jnp.asarray(pos), with_lm_head=False,
                          output_hidden_states=True)["hidden_states"]
    assert len(states) == module.config.num_hidden_layers + 1
    np.testing.assert_allclose(np.asarray(states[-1]), h, atol=1e-6)
    h0 = np.asarray(states[0], np.float64)
    feats0 = fewshot.encoder_features(module, params, ids, layer=0, attention_mask=mask,
                                      batch_size=50)
    np.testing.assert_allclose(feats0, (h0 * mask[..., None]).sum(1) / mask.sum(1, keepdims=True),
                               atol=1e-5)
    assert np.abs(feats0 - feats).max() > 1e-3  # a different layer, different features
    with pytest.raises(ValueError, match="out of range"):
        fewshot.encoder_features(module, params, ids, layer=3)


def class_words(num_classes=5, per_class=30, length=8, seed=0):
    """Synthetic images whose words come from class-specific sets of 6 ids (disjoint)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    ids = np.stack([10 + 6 * c + rng.integers(0, 6, size=length) for c in labels])
    return ids, labels


def test_run_fewshot_prototype_and_shuffled_control(tiny_encoder):
    module, params = tiny_encoder
    ids, labels = class_words()
    feats = fewshot.encoder_features(module, params, ids, batch_size=50)
    names = [f"c{i}" for i in range(5)]
    out = fewshot.run_fewshot(labels, names, n_way=5, k_shot=3, n_query=3, num_episodes=40,
                              seed=0, features=feats)
    assert out["chance"] == 0.2 and out["num_episodes"] == 40
    assert out["accuracy"] >= 0.95
    # 600 queries at chance 0.2 (sd ~0.016 if independent); shuffled words carry no label.
    assert abs(out["shuffled_accuracy"] - 0.2) < 0.08
    assert 0 < out["shuffled_ci95"] < 0.1


def overlap_scorer(prompt, class_names):
    """Stand-in for an LLM that reads the prompt: scores each class by how many of its support
    words the query shares. Parses the prompt's own lines, so it checks the prompt plumbing."""
    lines = prompt.split("\n")
    query = set(re.fullmatch(r"Input: (.*), output:", lines[-1]).group(1).split())
    score = dict.fromkeys(class_names, 0.0)
    for line in lines[:-1]:
        words, label = re.fullmatch(r"Input: (.*), output: (.*)", line).groups()
        score[label] += len(query & set(words.split()))
    return np.array([score[n] for n in class_names])


def test_run_fewshot_llm_route_with_prompt_reading_scorer():
    ids, labels = class_words(num_classes=4, per_class=20, seed=1)
    texts = [" ".join(f"w{i}" for i in row) for row in ids]
    out = fewshot.run_fewshot(labels, ["a", "b", "c", "d"], n_way=2, k_shot=3, n_query=2,
                              num_episodes=60, seed=3, texts=texts, lm_scorer=overlap_scorer)
    assert out["accuracy"] == 1.0
    assert abs(out["shuffled_accuracy"] - 0.5) < 0.12  # 240 queries, sd ~0.03 if independent
    with pytest.raises(ValueError, match="lm_scorer"):
        fewshot.run_fewshot(labels, ["a"] * 4, n_way=2, k_shot=1, texts=texts)
    with pytest.raises(ValueError, match="exactly one"):
        fewshot.run_fewshot(labels, ["a"] * 4, n_way=2, k_shot=1)


def test_make_lm_scorer_end_to_end(tokenizer, tiny_llama):
    """The real chain: tokenizer -> prompt ids -> padded batch through our Llama (ids < 64 only)."""
    module, params = tiny_llama
    fn = fewshot.causal_lm_logprob_fn(module, params)

    class Small:  # MiniLM's tokenizer, with ids folded into the tiny model's 64-word vocab
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
            return {"input_ids": [i % 64 for i in ids]}

    scorer = fewshot.make_lm_scorer(Small(), fn)
    prompt = "Input: red sky, output: sunset\nInput: a dog, output:"
    got = scorer(prompt, ["sunset", "pet"])
    want = fewshot.score_classes(fn, Small()(prompt)["input_ids"],
                                 [Small()(" sunset", False)["input_ids"],
                                  Small()(" pet", False)["input_ids"]])
    np.testing.assert_allclose(got, want)
    assert np.all(got < 0) and got.shape == (2,)
