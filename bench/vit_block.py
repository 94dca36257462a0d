"""One ViT block's jitted forward + backward, plain (models/vit.py) against released
(models/vit_released.py), at the LQAE tiny-config sizes of bench/vs_authors_lqae.py.

    python bench/vit_block.py [--batch 32 --grid 8 --width 256 --rounds 6]

value_and_grad of sum(block(x)^2) w.r.t. params and x, no remat; reports per block the minimum
over interleaved rounds of the wall time and of the process CPU time (both threads; less
sensitive than wall time to a shared machine's load), XLA's compiled FLOPs and temporary memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lqae_vlap.models import vit, vit_released  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--grid", type=int, default=8, help="patch grid side (64 px / patch 8)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args(argv)
    heads, mlp = args.width // 64 or 1, 4 * args.width
    x = jnp.asarray(np.random.default_rng(0).standard_normal(
        (args.batch, args.grid ** 2, args.width)), jnp.float32)
    blocks = {"plain": vit.Block(num_heads=heads, mlp_dim=mlp),
              "released": vit_released.Block(heads, mlp, (args.grid, args.grid))}
    fns = {}
    for name, block in blocks.items():
        params = block.init(jax.random.key(0), x)
        fn = jax.jit(jax.value_and_grad(lambda p, x, b=block: jnp.sum(b.apply(p, x) ** 2),
                                        argnums=(0, 1)))
        compiled = fn.lower(params, x).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        jax.block_until_ready(fn(params, x))
        fns[name] = (fn, params, float(cost["flops"]),
                     compiled.memory_analysis().temp_size_in_bytes, [], [])
    for _ in range(args.rounds):
        for fn, params, _, _, wall, cpu in fns.values():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(params, x))
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; batch {args.batch}, "
          f"grid {args.grid}x{args.grid}, width {args.width}, mlp {mlp}")
    print("| block | wall ms (min) | CPU ms (min) | GFLOP (compiled) | temp MB |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, _, flops, temp, wall, cpu) in fns.items():
        print(f"| {name} | {min(wall) * 1e3:.1f} | {min(cpu) * 1e3:.1f} | {flops / 1e9:.2f} | "
              f"{temp / 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
