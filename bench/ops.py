"""Benchmark of the two kernels in lqae_vlap/ops against their obvious versions (and ott-jax).

    python bench/ops.py --out ops_gpu.json   # the issue's sweep (for an accelerator, e.g. H100)
    python bench/ops.py --quick              # small sizes that finish on a laptop CPU

Sinkhorn (3 iterations, float32, epsilon 0.05 as in shared/reference/anchor_bench.py): ours in
lax (log domain, fori_loop), ours fused (ops/sinkhorn_pallas.py, Triton; on a CPU it would run in
the Pallas interpreter, so it is not timed there unless --fused-on-cpu), the obvious exp-domain
SwAV loop, and ott-jax (optional: pip install lqae_vlap[bench]) on the same problem. Floor = one
read of the scores plus one write of Q at the memory bandwidth; '% floor' = floor / time. The
fused kernel is checked against the lax version before it is timed.
Nearest word: ours (chunked over the vocabulary, running top-1) vs the full [N, K] distance
matrix + argmin, bf16; floor = 2 N K D FLOPs at the bf16 matmul peak; temporaries from the
compiled memory analysis. Timings are the best of --reps calls after a warm-up call; a size that
fails (out of memory) is recorded as failed. Prints Markdown tables, writes JSON (--out).
The peaks default to the H100 SXM spec (3.35 TB/s, 989 TFLOP/s bf16); on a CPU they are measured.
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
from lqae_vlap.ops import quantize, sinkhorn, sinkhorn_pallas  # noqa: E402


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


def ott_sinkhorn(epsilon: float):
    """ott-jax's Sinkhorn on the anchor's problem (shared/reference/anchor_bench.py): absolute
    epsilon, lse mode (the default), exactly 3 iterations (min = max: a scan, the marginal
    error evaluated once at the end), P materialised by `.matrix`. None if ott is missing."""
    try:
        from ott.geometry import geometry
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn as ott_s
    except ImportError:
        return None

    def run(s):
        geom = geometry.Geometry(cost_matrix=-s, epsilon=epsilon)
        solver = ott_s.Sinkhorn(lse_mode=True, max_iterations=3, min_iterations=3,
                                inner_iterations=1)
        return solver(linear_problem.LinearProblem(geom)).matrix

    return jax.jit(run)


def try_time(f, *args, reps: int) -> float | str:
    """Milliseconds, or the reason it did not run (out of memory at the largest sizes)."""
    try:
        return timeit(f, *args, reps=reps) * 1e3
    except Exception as e:  # noqa: BLE001 - a benchmark row records the failure and goes on
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


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


def fmt(x, spec=".2f") -> str:
    return format(x, spec) if isinstance(x, float) else ("-" if x is None else str(x))


def frac(floor_ms: float, ms) -> str:
    """Fraction of the floor reached (floor time / measured time)."""
    return f"{floor_ms / ms:.0%}" if isinstance(ms, float) else "-"


def sinkhorn_rows(sizes, vocab, epsilon, bandwidth, reps, fused_on_cpu):
    on_cpu = jax.devices()[0].platform == "cpu"
    time_fused = not on_cpu or fused_on_cpu
    ours_s = jax.jit(lambda s: sinkhorn.sinkhorn(s, epsilon=epsilon, num_iters=3))
    fused_s = jax.jit(lambda s: sinkhorn_pallas.sinkhorn_fused(s, epsilon=epsilon, num_iters=3))
    obvious_s = jax.jit(lambda s: obvious_sinkhorn(s, epsilon))
    ott_s = ott_sinkhorn(epsilon)
    rows = []
    for b in sizes:
        s = jax.random.uniform(jax.random.PRNGKey(0), (b, vocab), minval=-1, maxval=1)
        r = dict(kernel="sinkhorn", B=b, K=vocab, epsilon=epsilon,
                 floor_ms=2 * b * vocab * 4 / bandwidth * 1e3,
                 ours_ms=try_time(ours_s, s, reps=reps),
                 obvious_ms=try_time(obvious_s, s, reps=reps),
                 ott_ms=try_time(ott_s, s, reps=reps) if ott_s is not None else "not installed")
        if time_fused:
            # Check before timing: a fast wrong kernel is worth nothing.
            try:
                diff = jnp.max(jnp.abs(fused_s(s) - ours_s(s)))
                r["fused_vs_lax_max_abs"] = float(diff)
            except Exception as e:  # noqa: BLE001
                r["fused_vs_lax_max_abs"] = f"failed: {type(e).__name__}"
            r["fused_ms"] = try_time(fused_s, s, reps=reps)
            if on_cpu:
                r["fused_note"] = "interpret mode, not meaningful"
        else:
            r["fused_ms"] = "not timed (CPU: Pallas interpreter)"
        rows.append(r)
        print(r, flush=True)
        del s
    return rows


def search_rows(sizes, dims, vocab, peak, reps):
    rows = []
    for d in dims:
        cb = jax.random.normal(jax.random.PRNGKey(1), (vocab, d), jnp.bfloat16)
        ours_q = jax.jit(lambda x, cb=cb: quantize.nearest_neighbors(x, cb, chunk_size=8192)[1])
        full_q = jax.jit(lambda x, cb=cb: obvious_search(x, cb))
        for n in sizes:
            x = jax.random.normal(jax.random.PRNGKey(2), (n, d), jnp.bfloat16)
            r = dict(kernel="nearest_word", N=n, K=vocab, D=d,
                     floor_ms=2 * n * vocab * d / peak * 1e3,
                     ours_ms=try_time(ours_q, x, reps=reps),
                     obvious_ms=try_time(full_q, x, reps=reps))
            for name, f in (("ours", ours_q), ("obvious", full_q)):
                try:
                    r[f"{name}_temp_MiB"] = (f.lower(x).compile().memory_analysis()
                                             .temp_size_in_bytes / 2 ** 20)
                except Exception as e:  # noqa: BLE001
                    r[f"{name}_temp_MiB"] = f"failed: {type(e).__name__}"
            rows.append(r)
            print(r, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized sweep")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=0.05,
                   help="Sinkhorn epsilon for every implementation (0.05 = the anchor's)")
    p.add_argument("--fused-on-cpu", action="store_true",
                   help="also time the Pallas kernel on CPU (interpreter: not meaningful)")
    p.add_argument("--only", choices=("sinkhorn", "search"), default=None)
    p.add_argument("--sinkhorn-sizes", default="",
                   help="comma-separated batch sizes B, replacing the sweep's (e.g. 16384)")
    p.add_argument("--bandwidth", type=float, default=3.35e12,
                   help="accelerator memory bytes/s (H100 SXM spec; the anchor used 3.0e12)")
    p.add_argument("--peak", type=float, default=989e12,
                   help="accelerator bf16 FLOP/s (H100 SXM dense spec; the anchor used 885e12)")
    args = p.parse_args()

    device = jax.devices()[0]
    if device.platform == "cpu":
        bandwidth, peak = measured_peaks()
    else:
        bandwidth, peak = args.bandwidth, args.peak
    vocab = 50272
    if args.quick:
        sink_sizes, search_sizes, dims = [256, 1024], [256, 1024], [768]
    else:
        sink_sizes, search_sizes, dims = [256, 1024, 4096, 16384, 65536], \
            [256, 1024, 4096, 16384, 65536], [768, 2048]
    if args.sinkhorn_sizes:
        sink_sizes = [int(b) for b in args.sinkhorn_sizes.split(",")]
    rows = []
    if args.only in (None, "sinkhorn"):
        rows += sinkhorn_rows(sink_sizes, vocab, args.epsilon, bandwidth, args.reps,
                              args.fused_on_cpu)
    if args.only in (None, "search"):
        rows += search_rows(search_sizes, dims, vocab, peak, args.reps)

    print(f"\n{device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"{platform.machine()}; memory {bandwidth / 1e9:.1f} GB/s, bf16 matmul "
          f"{peak / 1e12:.3f} TFLOP/s ({'measured' if device.platform == 'cpu' else 'spec'})")
    sink = [r for r in rows if r["kernel"] == "sinkhorn"]
    if sink:
        print(f"\nSinkhorn, 3 iterations, float32, epsilon {args.epsilon}; floor = one read of the "
              "scores + one write of Q; '% floor' = floor / time")
        print("| B x K | lax ms | fused ms | obvious ms | ott-jax ms | floor ms | "
              "lax % floor | fused % floor | fused - lax max abs |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in sink:
            print(f"| {r['B']} x {r['K']} | {fmt(r['ours_ms'])} | {fmt(r['fused_ms'])}"
                  f"{' (' + r['fused_note'] + ')' if 'fused_note' in r else ''} | "
                  f"{fmt(r['obvious_ms'])} | {fmt(r['ott_ms'])} | {r['floor_ms']:.3f} | "
                  f"{frac(r['floor_ms'], r['ours_ms'])} | {frac(r['floor_ms'], r['fused_ms'])} | "
                  f"{fmt(r.get('fused_vs_lax_max_abs'), '.1e')} |")
    search = [r for r in rows if r["kernel"] == "nearest_word"]
    if search:
        print("\nNearest word, bf16, top-1; floor = 2 N K D FLOPs at the bf16 matmul peak")
        print("| N x K x D | ours ms | obvious ms | floor ms | ours % peak | obvious % peak | "
              "temp MiB ours / obvious |")
        print("|---|---|---|---|---|---|---|")
        for r in search:
            print(f"| {r['N']} x {r['K']} x {r['D']} | {fmt(r['ours_ms'])} | "
                  f"{fmt(r['obvious_ms'])} | {r['floor_ms']:.3f} | "
                  f"{frac(r['floor_ms'], r['ours_ms'])} | {frac(r['floor_ms'], r['obvious_ms'])} | "
                  f"{fmt(r['ours_temp_MiB'], '.1f')} / {fmt(r['obvious_temp_MiB'], '.1f')} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device.device_kind, platform=device.platform, rows=rows,
                           bandwidth=bandwidth, peak=peak, jax=jax.__version__), f, indent=1)


if __name__ == "__main__":
    main()
