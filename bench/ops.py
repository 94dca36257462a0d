"""Benchmark of the two kernels in lqae_vlap/ops against their obvious versions (and ott-jax).

    python bench/ops.py                 # the issue's sweep (for an accelerator)
    python bench/ops.py --quick         # small sizes that finish on a laptop CPU

Sinkhorn: ours (log domain, lax.fori_loop) vs the obvious exp-domain SwAV loop vs ott-jax's
Sinkhorn (when installed), 3 iterations, float32; floor = one read of the scores plus one write of
Q at the memory bandwidth. Nearest word: ours (chunked over the vocabulary, running top-1) vs the
full [N, K] distance matrix + argmin, bf16; floor = 2 N K D FLOPs at the matmul peak; temporaries
from the compiled memory analysis. Prints a Markdown table and writes JSON (--out).
The peaks default to an H100 (3.35 TB/s, 989 TFLOP/s bf16); on a CPU they are measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lqae_vlap.ops import quantize, sinkhorn  # noqa: E402


def timeit(f, *args, reps: int) -> float:
    jax.block_until_ready(f(*args))  # compile + warm up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def obvious_sinkhorn(scores, epsilon=0.05, iters=3):
    """SwAV's exp-domain loop, everything materialised (overflows for small epsilon)."""
    q = jnp.exp(scores / epsilon).T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(1, keepdims=True) / k
        q = q / q.sum(0, keepdims=True) / b
    return (q * b).T


def obvious_search(x, codebook):
    d = (jnp.sum(x.astype(jnp.float32) ** 2, 1, keepdims=True)
         - 2 * (x @ codebook.T).astype(jnp.float32)
         + jnp.sum(codebook.astype(jnp.float32) ** 2, 1)[None])
    return jnp.argmin(d, 1)


def ott_sinkhorn():
    try:
        from ott.geometry import geometry
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn as ott_s
    except ImportError:
        return None

    def run(s):
        geom = geometry.Geometry(cost_matrix=-s, epsilon=0.05)
        solver = ott_s.Sinkhorn(max_iterations=3, min_iterations=3, inner_iterations=1)
        return solver(linear_problem.LinearProblem(geom)).matrix

    return jax.jit(run)


def measured_peaks() -> tuple[float, float]:
    """(bytes/s, bf16 FLOP/s) measured on this machine: a big copy and a big matmul."""
    x = jnp.ones((4096, 4096), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0)
    t = timeit(copy, x, reps=5)
    bandwidth = 2 * x.size * 4 / t
    a = jnp.ones((2048, 2048), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    t = timeit(mm, a, reps=3)
    return bandwidth, 2 * 2048 ** 3 / t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized sweep")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()

    device = jax.devices()[0]
    if device.platform == "cpu":
        bandwidth, peak = measured_peaks()
    else:
        bandwidth, peak = 3.35e12, 989e12
    vocab = 50272
    if args.quick:
        sink_sizes, search_sizes, dims = [256, 1024], [256, 1024], [768]
    else:
        sink_sizes, search_sizes, dims = [256, 1024, 4096, 16384, 65536], \
            [256, 1024, 4096, 16384, 65536], [768, 2048]
    rows = []
    ours_s = jax.jit(lambda s: sinkhorn.sinkhorn(s, epsilon=0.05, num_iters=3))
    obvious_s = jax.jit(obvious_sinkhorn)
    ott_s = ott_sinkhorn()
    for b in sink_sizes:
        s = jax.random.uniform(jax.random.PRNGKey(0), (b, vocab), minval=-1, maxval=1)
        floor = 2 * b * vocab * 4 / bandwidth
        r = dict(kernel="sinkhorn", B=b, K=vocab, ours_ms=timeit(ours_s, s, reps=args.reps) * 1e3,
                 obvious_ms=timeit(obvious_s, s, reps=args.reps) * 1e3, floor_ms=floor * 1e3)
        if ott_s is not None:
            r["ott_ms"] = timeit(ott_s, s, reps=args.reps) * 1e3
        rows.append(r)
        print(r, flush=True)
    for d in dims:
        cb = jax.random.normal(jax.random.PRNGKey(1), (vocab, d), jnp.bfloat16)
        ours_q = jax.jit(lambda x, cb=cb: quantize.nearest_neighbors(x, cb, chunk_size=8192)[1])
        full_q = jax.jit(lambda x, cb=cb: obvious_search(x, cb))
        for n in search_sizes:
            x = jax.random.normal(jax.random.PRNGKey(2), (n, d), jnp.bfloat16)
            floor = 2 * n * vocab * d / peak
            r = dict(kernel="nearest_word", N=n, K=vocab, D=d,
                     ours_ms=timeit(ours_q, x, reps=args.reps) * 1e3,
                     obvious_ms=timeit(full_q, x, reps=args.reps) * 1e3, floor_ms=floor * 1e3,
                     ours_temp_MiB=ours_q.lower(x).compile().memory_analysis().temp_size_in_bytes
                     / 2 ** 20,
                     obvious_temp_MiB=full_q.lower(x).compile().memory_analysis()
                     .temp_size_in_bytes / 2 ** 20)
            rows.append(r)
            print(r, flush=True)

    print(f"\n{device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"{platform.machine()}; memory {bandwidth / 1e9:.1f} GB/s, bf16 matmul "
          f"{peak / 1e12:.3f} TFLOP/s ({'measured' if device.platform == 'cpu' else 'H100 spec'})")
    print("| kernel | size | ours ms | obvious ms | ott-jax ms | floor ms | ours / floor | "
          "temp MiB ours / obvious |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = (f"B={r['B']} K={r['K']}" if r["kernel"] == "sinkhorn"
                else f"N={r['N']} K={r['K']} D={r['D']}")
        ott = f"{r['ott_ms']:.2f}" if "ott_ms" in r else "-"
        temp = (f"{r['ours_temp_MiB']:.1f} / {r['obvious_temp_MiB']:.1f}"
                if "ours_temp_MiB" in r else "-")
        print(f"| {r['kernel']} | {size} | {r['ours_ms']:.2f} | {r['obvious_ms']:.2f} | {ott} | "
              f"{r['floor_ms']:.3f} | {r['ours_ms'] / r['floor_ms']:.1f}x | {temp} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device.device_kind, platform=device.platform, rows=rows,
                           bandwidth=bandwidth, peak=peak), f, indent=1)


if __name__ == "__main__":
    main()
