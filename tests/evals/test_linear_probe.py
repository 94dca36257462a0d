"""Linear probe: the released pooling against NumPy, LARS + cosine against a hand computation,
separable data -> ~100%, random labels -> chance, the loss reaches scikit-learn's optimum, and
the feature cache (keyed by feature kind and dtype) is read on the second call."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from lqae_vlap.evals.linear_probe import (ProbeHead, cache_key, cached_features, check_protocol,
                                          probe_optimizer, token_means_after_first,
                                          train_linear_probe)


def blobs(n_per_class, num_classes=4, dim=16, spread=1.0, seed=0, centre_seed=0):
    """Gaussian classes around centres fixed by centre_seed; seed draws the points."""
    centres = np.random.default_rng(centre_seed).normal(size=(num_classes, dim)) * 3.0
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n_per_class)
    # An offset and unequal scales: the LayerNorm has work to do.
    x = (centres[y] + spread * rng.normal(size=(len(y), dim))) * np.linspace(0.1, 5, dim) + 7.0
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


def test_token_means_after_first_match_numpy():
    rng = np.random.default_rng(0)
    states = [rng.normal(size=(3, 5, d)).astype(np.float32) for d in (4, 4, 6)]
    got = np.asarray(token_means_after_first([jnp.asarray(s) for s in states]))
    want = np.concatenate([s.astype(np.float64)[:, 1:, :].sum(1) / 4 for s in states], axis=1)
    assert got.shape == (3, 14) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="tokens >= 2"):
        token_means_after_first([jnp.zeros((2, 1, 4))])


def test_lars_and_cosine_match_a_hand_computation_for_two_steps():
    """optax.lars (weight decay, trust ratio 0.001 |p| / |u| per leaf, x -lr, momentum trace)
    under the cosine schedule with peak lr * batch / 256, against NumPy float64 written from
    LARS's definition; the second step's lr is the cosine's at 1 of 4 steps."""
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(5, 3)), "bias": np.zeros(3), "scale": np.ones(5)}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(2)]
    lr, batch, total, wd, mom, tc = 0.5, 512, 4, 1e-2, 0.9, 1e-3
    tx, schedule = probe_optimizer("lars", lr=lr, batch_size=batch, total_steps=total,
                                   weight_decay=wd, momentum=mom,
                                   params=jax.tree.map(jnp.asarray, params))
    p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
    state = tx.init(p)
    want = {k: v.copy() for k, v in params.items()}
    trace = {k: np.zeros_like(v) for k, v in params.items()}
    for t, g in enumerate(grads):
        lr_t = lr * batch / 256 * 0.5 * (1 + np.cos(np.pi * t / total))
        assert float(schedule(t)) == pytest.approx(lr_t, rel=1e-6)
        for k in want:
            u = g[k] + wd * want[k]
            pn, un = np.linalg.norm(want[k]), np.linalg.norm(u)
            ratio = 1.0 if pn == 0 or un == 0 else tc * pn / un  # a zero norm: ratio 1
            trace[k] = mom * trace[k] - lr_t * ratio * u
            want[k] = want[k] + trace[k]
        updates, state = tx.update(jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), g),
                                   state, p)
        p = jax.tree.map(lambda a, b: a + b, p, updates)
    for k in want:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(p["bias"]), 0)  # the zero bias moved (ratio 1 at first)


@pytest.mark.parametrize("optimizer,lr", [("lars", 20.0), ("adamw", 0.05)])
def test_separable_features_reach_full_accuracy(optimizer, lr):
    tx, ty = blobs(50, spread=0.3)
    vx, vy = blobs(25, spread=0.3, seed=1)  # the same classes, new points
    out = train_linear_probe(tx, ty, vx, vy, num_classes=4, optimizer=optimizer, lr=lr,
                             epochs=60, batch_size=32)
    assert out["train_top1"] == 1.0 and out["top1"] >= 0.99
    assert out["steps"] == 60 * (200 // 32) and out["lr_peak"] == pytest.approx(lr * 32 / 256)


def test_the_released_lr_barely_moves_the_head_in_a_few_steps():
    """LARS at lr 1e-4 per 256 with trust coefficient 0.001 changes each weight by ~1e-7 of its
    norm per step: a few hundred steps on the toy problem leave it near its random start, which
    is why the tiny configs raise eval.probe.lr."""
    tx, ty = blobs(50, spread=0.3)
    out = train_linear_probe(tx, ty, tx, ty, num_classes=4, optimizer="lars", lr=1e-4,
                             epochs=60, batch_size=32)
    assert out["train_top1"] < 0.9


def test_random_labels_stay_at_chance_on_validation():
    rng = np.random.default_rng(1)
    tx, vx = rng.normal(size=(300, 32)), rng.normal(size=(400, 32))
    ty, vy = rng.integers(0, 4, 300), rng.integers(0, 4, 400)
    out = train_linear_probe(tx, ty, vx, vy, num_classes=4, optimizer="adamw", lr=0.05,
                             epochs=200)
    assert abs(out["top1"] - 0.25) < 0.07  # 400 draws at p=0.25: sd 0.022
    assert out["train_top1"] > 0.4  # it does fit the training noise


def test_full_batch_reaches_logistic_regression_optimum():
    """No weight decay, full batch: LayerNorm + Dense spans exactly the affine maps of the
    row-normalised features, so its training cross-entropy reaches the (unregularised)
    multinomial optimum that scikit-learn's L-BFGS finds on (x - mean_row) / sqrt(var_row + eps)."""
    tx, ty = blobs(60, spread=10.0, centre_seed=3)  # overlapping classes
    x64 = tx.astype(np.float64)
    rows = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-6)
    ref = LogisticRegression(C=1e6, max_iter=5000, tol=1e-10).fit(rows, ty)
    ref_loss = -np.mean(np.log(ref.predict_proba(rows)[np.arange(len(ty)), ty]))
    out = train_linear_probe(tx, ty, tx, ty, num_classes=4, optimizer="adamw", lr=0.1,
                             epochs=1500, weight_decay=0.0)
    assert out["train_loss"] == pytest.approx(ref_loss, abs=5e-3)
    assert abs(out["train_top1"] - ref.score(rows, ty)) <= 0.02


def test_bad_inputs_raise():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="outside"):
        train_linear_probe(x, np.array([0, 1, 2, 5]), x, np.zeros(4, int), num_classes=3)
    with pytest.raises(ValueError, match="integer labels"):
        train_linear_probe(x, np.zeros(4), x, np.zeros(4, int), num_classes=3)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        train_linear_probe(x, np.zeros(4, int), x, np.zeros(4, int), num_classes=3,
                           optimizer="sgd")
    good = dict(features="released", optimizer="lars", cache_dtype="float16", epochs=1,
                batch_size=0)
    check_protocol(good)
    for key, value in (("features", "cls"), ("optimizer", "sgd"), ("cache_dtype", "int8"),
                       ("epochs", -1)):
        with pytest.raises(ValueError, match=f"config.eval.probe.{key}="):
            check_protocol({**good, key: value})


def test_cache_is_read_on_the_second_call_and_keyed_by_kind_and_dtype(tmp_path):
    calls = []

    def compute(value):
        def fn():
            calls.append(value)
            return np.full((3, 2), value + 0.1, np.float32), np.arange(3)
        return fn

    kw = dict(step=10, features="released", layer="all", split="train", max_images=0)
    a = cached_features(tmp_path, **kw, dtype="float16", compute_fn=compute(1.0))
    b = cached_features(tmp_path, **kw, dtype="float16", compute_fn=compute(2.0))
    assert calls == [1.0]  # the second call read the file
    assert a[0].dtype == b[0].dtype == np.float16
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(b[1], [0, 1, 2])
    c = cached_features(tmp_path, **kw, dtype="float32", compute_fn=compute(3.0))
    assert calls == [1.0, 3.0] and c[0].dtype == np.float32 and c[0][0, 0] == np.float32(3.1)
    d = cached_features(tmp_path, **{**kw, "features": "lm_layer", "layer": -1},
                        dtype="float32", compute_fn=compute(4.0))
    assert calls == [1.0, 3.0, 4.0] and d[0][0, 0] == np.float32(4.1)
    base = dict(step=10, features="released", layer="all", split="train", dtype="float16",
                max_images=0)
    variants = [base, {**base, "step": 11}, {**base, "features": "lm_layer"},
                {**base, "layer": -2}, {**base, "split": "val"}, {**base, "dtype": "float32"},
                {**base, "max_images": 64}]
    assert len({cache_key(**v) for v in variants}) == len(variants)
    assert not list(tmp_path.glob("*.tmp*"))


def test_probe_head_is_layer_norm_then_dense_with_allowed_axes():
    head = ProbeHead(5)
    boxed = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 3)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert {leaf.names for leaf in leaves} == {("embed", "vocab"), ("vocab",), ("norm",)}
    params = nn.meta.unbox(head.init(jax.random.key(0), jnp.zeros((1, 3))))
    x = np.random.default_rng(0).normal(size=(4, 3)) * 5 + 2
    p = jax.tree.map(np.asarray, params["params"])
    ln = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-6)
    ln = ln * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
    want = ln @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    got = np.asarray(head.apply(params, jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(p["Dense_0"]["kernel"]).max() > 0  # lecun_normal, not zeros
