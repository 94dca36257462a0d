"""What a VLAP run on digit scenes costs: the train step and each evaluation, timed apart.

    python bench/vlap_scenes_budget.py --lqae-workdir /tmp/lqae_scenes --steps 20
    python bench/vlap_scenes_budget.py --lqae-workdir /tmp/lqae_scenes --steps 20 --cache \\
        --evals loss,captioning,retrieval,arithmetic --set eval.captioning.max_images=32

configs/vlap_scenes.py (the real SmolLM2-135M, the frozen LQAE encoder of --lqae-workdir), with
``--set key=value`` overrides (Python literals, as ``--config.key=value``). One process: the
build (LLM load, the frozen feature cache with --cache), the jitted train step (compile, then
--steps timed steps), then each evaluation of --evals alone through the method's evaluator.
Wall and CPU time (all threads, ``time.process_time``) are both printed and written as JSON
(--out): on a shared machine the CPU time is the figure that depends least on the other jobs;
an idle 2-core machine runs at most 2 CPU-seconds per second.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(overrides: list[str]):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("vlap_scenes",
                                                  os.path.join(root, "configs", "vlap_scenes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


class _Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lqae-workdir", required=True)
    ap.add_argument("--steps", type=int, default=20, help="timed train steps after the compile")
    ap.add_argument("--cache", action="store_true", help="data.feature_cache.enabled=True")
    ap.add_argument("--evals", default="", help="comma-separated evaluations to time")
    ap.add_argument("--set", action="append", default=[], help="key=value config override")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import jax

    from lqae_vlap.core import sharding
    from lqae_vlap.methods import vlap
    from lqae_vlap.train import trainer

    tmp = tempfile.mkdtemp(prefix="vlap_budget_")
    c = _config([f"model.vision.workdir={args.lqae_workdir}",
                 f"data.feature_cache.enabled={args.cache}",
                 f"data.feature_cache.dir={os.path.join(tmp, 'cache')}", *args.set])
    out = {"load": os.getloadavg(), "cpus": os.cpu_count(), "cache": args.cache,
           "batch_size": c.data.batch_size, "overrides": args.set}
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    with _Clock() as t:
        method = vlap.build(c, mesh)
    out["build"] = {"wall_s": t.wall, "cpu_s": t.cpu}
    tx, schedule = trainer.make_optimizer(c.optim, max(args.steps, 1), c.data.batch_size)
    init, _, state_sh = trainer.build_state(method, tx, mesh, c.seed)
    state = init()
    batch0 = method.train_batches.batch_at(0)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch0.items()}
    step = trainer.make_train_step(method, tx, schedule, c.seed, state_sh, batch_sh, mesh)
    with _Clock() as t:  # the first step: compile + run
        state, m = step(state, method.frozen, trainer._to_global(batch0, mesh))
        jax.block_until_ready(m["loss"])
    out["first_step"] = {"wall_s": t.wall, "cpu_s": t.cpu}
    with _Clock() as t:
        for s in range(1, args.steps + 1):
            batch = trainer._to_global(method.train_batches.batch_at(s), mesh)
            state, m = step(state, method.frozen, batch)
        jax.block_until_ready(m["loss"])
    out["step"] = {"wall_s": t.wall / max(args.steps, 1), "cpu_s": t.cpu / max(args.steps, 1),
                   "steps": args.steps}
    print(f"build {out['build']['wall_s']:.1f} s; first step {out['first_step']['wall_s']:.1f} s;"
          f" then {out['step']['wall_s']:.2f} s/step wall, {out['step']['cpu_s']:.2f} CPU-s/step "
          f"(batch {c.data.batch_size}, cache {args.cache}, load {out['load'][0]:.1f})",
          flush=True)
    out["evals"] = {}
    params = state["params"]
    for name in [x for x in args.evals.split(",") if x]:
        with _Clock() as t:
            scalars = method.evaluate(params, method.frozen, 0, tmp, names=[name])
        out["evals"][name] = {"wall_s": t.wall, "cpu_s": t.cpu, "scalars": scalars}
        print(f"eval {name}: {t.wall:.1f} s wall, {t.cpu:.1f} CPU-s", flush=True)
    out["load_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
