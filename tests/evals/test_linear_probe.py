"""Linear probe: separable data -> ~100%, random labels -> chance on validation, the loss reaches
the optimum found by scikit-learn's LogisticRegression, and the feature cache round trip."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from lqae_vlap.evals.linear_probe import cache_key, cached_features, train_linear_probe


def blobs(n_per_class, num_classes=4, dim=16, spread=1.0, seed=0, centre_seed=0):
    """Gaussian classes around centres fixed by centre_seed; seed draws the points."""
    centres = np.random.default_rng(centre_seed).normal(size=(num_classes, dim)) * 3.0
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n_per_class)
    # An offset and unequal scales: standardisation has work to do.
    x = (centres[y] + spread * rng.normal(size=(len(y), dim))) * np.linspace(0.1, 50, dim) + 7.0
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


def test_separable_features_reach_full_accuracy():
    tx, ty = blobs(50, spread=0.3)
    vx, vy = blobs(25, spread=0.3, seed=1)  # the same classes, new points
    out = train_linear_probe(tx, ty, vx, vy, num_classes=4, epochs=60, batch_size=32)
    assert out["train_top1"] == 1.0 and out["top1"] >= 0.99


def test_random_labels_stay_at_chance_on_validation():
    rng = np.random.default_rng(1)
    tx, vx = rng.normal(size=(300, 32)), rng.normal(size=(400, 32))
    ty, vy = rng.integers(0, 4, 300), rng.integers(0, 4, 400)
    out = train_linear_probe(tx, ty, vx, vy, num_classes=4, epochs=200)
    assert abs(out["top1"] - 0.25) < 0.07  # 400 draws at p=0.25: sd 0.022
    assert out["train_top1"] > 0.4  # it does fit the training noise


def test_full_batch_reaches_logistic_regression_optimum():
    """No weight decay, full batch: the training cross-entropy matches the (unregularised)
    multinomial optimum from scikit-learn's L-BFGS on the same standardised features."""
    tx, ty = blobs(60, spread=10.0, centre_seed=3)  # overlapping classes: optimum loss ~0.66
    xs = (tx - tx.mean(0)) / (tx.std(0) + 1e-6)
    ref = LogisticRegression(C=1e6, max_iter=5000, tol=1e-10).fit(xs, ty)
    ref_loss = -np.mean(np.log(ref.predict_proba(xs)[np.arange(len(ty)), ty]))
    out = train_linear_probe(tx, ty, tx, ty, num_classes=4, epochs=800, learning_rate=0.05,
                             weight_decay=0.0)
    assert out["train_loss"] == pytest.approx(ref_loss, abs=2e-3)  # observed 1e-6
    assert abs(out["train_top1"] - ref.score(xs, ty)) <= 0.02


def test_bad_labels_raise():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="outside"):
        train_linear_probe(x, np.array([0, 1, 2, 5]), x, np.zeros(4, int), num_classes=3)
    with pytest.raises(ValueError, match="integer labels"):
        train_linear_probe(x, np.zeros(4), x, np.zeros(4, int), num_classes=3)


def test_cache_round_trip(tmp_path):
    calls = []

    def compute(value):
        def fn():
            calls.append(value)
            return np.full((3, 2), value, np.float32), np.arange(3)
        return fn

    a = cached_features(tmp_path, step=10, layer=-1, split="train", compute_fn=compute(1.0))
    b = cached_features(tmp_path, step=10, layer=-1, split="train", compute_fn=compute(2.0))
    assert calls == [1.0]  # the second call read the file
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(b[1], [0, 1, 2])
    c = cached_features(tmp_path, step=11, layer=-1, split="train", compute_fn=compute(3.0))
    assert calls == [1.0, 3.0] and c[0][0, 0] == 3.0
    assert len({cache_key(10, -1, "train"), cache_key(11, -1, "train"),
                cache_key(10, -2, "train"), cache_key(10, -1, "val")}) == 4
    assert not list(tmp_path.glob("*.tmp*"))


def test_probe_weights_have_allowed_logical_axes():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lqae_vlap.evals.linear_probe import LinearProbe

    boxed = jax.eval_shape(LinearProbe(5).init, jax.random.key(0), jnp.zeros((1, 3)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert {leaf.names for leaf in leaves} == {("embed", "vocab"), ("vocab",)}
