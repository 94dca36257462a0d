"""Sinkhorn with the batch split over data x fsdp (as inside the trainer's step) equals one device."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lqae_vlap.ops.sinkhorn import sinkhorn
from lqae_vlap.core import sharding


def test_batch_sharded_equals_unsharded():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    scores = jax.random.uniform(jax.random.PRNGKey(0), (64, 1000), minval=-1, maxval=1)
    marginal = jax.random.uniform(jax.random.PRNGKey(1), (1000,)) + 0.1
    marginal = marginal / marginal.sum()
    f = lambda s, c: sinkhorn(s, epsilon=0.05, num_iters=3, col_marginal=c)  # noqa: E731
    want = jax.jit(f)(scores, marginal)
    batch = sharding.batch_sharding(mesh, 2)
    got = jax.jit(f, in_shardings=(batch, NamedSharding(mesh, P())), out_shardings=batch)(
        jax.device_put(scores, batch), marginal)
    assert got.sharding.spec == P(("data", "fsdp"), None)
    assert len(got.addressable_shards) == 8
    # The column step's logsumexp over the batch becomes a cross-device reduction in another
    # order: float32 rounding (6e-8) amplified by 1/epsilon = 20 through exp, hence rtol 1e-5.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=0)
    np.testing.assert_allclose(np.asarray(got).sum(1), 1.0, rtol=1e-5)
