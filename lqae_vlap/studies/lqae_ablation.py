"""LQAE's central claim at laptop scale: its frozen-LM words against the paper's baselines.

    python -m lqae_vlap.studies.lqae_ablation --workdir=DIR [--quick] [--seeds=3] [--steps=N]

Trains each variant for each seed with the project's own trainer (``train_and_evaluate`` on
configs/lqae_demo.py: the real digits, the real all-MiniLM-L6-v2 codebook, equal steps, batch and
data order per seed), evaluates the final checkpoint, and writes to DIR ``study.md`` (the table,
also printed), ``study.json`` (every run's numbers, the settings, timings) and ``study.png`` (a
bar chart with 95% confidence intervals). Each run lives in ``DIR/<variant>/seed<k>``; the same
command resumes a killed study (finished runs are read back, not retrained).

Variants (``VARIANTS``; ``--variants`` picks others):
  lqae       LQAE as configs/lqae_demo.py trains it: nearest MiniLM word (straight-through), half
             the positions masked, the frozen MiniLM refills them and the decoder reconstructs
             from its output (``loss.recon_lm=1``; the demo also keeps the direct path,
             ``recon_quantized=1``, see its docstring for why);
  vqvae      the same autoencoder with a LEARNED codebook of MiniLM's size and width (30,522 x
             384; a plain VQ-VAE, the authors' "strawman codebook"): VQ-VAE codebook loss,
             no LM in training; wherever an LM reads the codes, code i is MiniLM's word i;
  no_refill  LQAE's frozen words without masking and LM refill: the decoder reads the quantized
             words only (``recon_lm=0``, mask ratio 0), the LM is not run in training;
  lqae_released_loss  (not in the default set) the lqae row with the released losses: the
             image reconstructed only through the LM (``recon_quantized=0``).

Metrics (every cell: mean and 95% Student-t interval over seeds, evals/stats.py): few-shot
accuracy in Frozen's open-ended protocol with SmolLM2-135M generating the answer
(evals/fewshot_frozen.py), few-shot accuracy by class prototypes of MiniLM's features of the
words (evals/fewshot.py), the released linear probe (evals/linear_probe.py), reconstruction PSNR
on [0, 1] pixels from the codes and after the LM refill (n/a where the decoder never trained on
the LM's output), and the codebook perplexity. The last table row is chance or the control: 1/ways
(and the shuffled-words control of the prototypes), the majority class for the probe, and for
PSNR the mean training image as every reconstruction.

``--quick``: 1 seed, a few steps, tiny evaluations: checks the pipeline and the table's shape in
minutes, says nothing about the outcome.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from lqae_vlap.studies import common

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "lqae_demo.py")


Variant = common.Variant


# No masking and no LM in the training step (the loss skips the LM when no term reads it).
_WITHOUT_LM = {"loss.recon_quantized": 1.0, "loss.recon_lm": 0.0, "loss.mlm": 0.0,
               "loss.mask_ratio_min": 0.0, "loss.mask_ratio_max": 0.0}

VARIANTS: dict[str, Variant] = {
    "lqae": Variant("LQAE", "frozen MiniLM words, half masked, refilled by the frozen LM", {}),
    "vqvae": Variant("VQ-VAE", "learned codebook of MiniLM's [V, D] (strawman), no LM",
                     {"quantizer.codebook": "learned", **_WITHOUT_LM}),
    "no_refill": Variant("LQAE, no mask/refill", "frozen MiniLM words, decoder reads them directly",
                         dict(_WITHOUT_LM)),
    "lqae_released_loss": Variant("LQAE, released loss", "lqae with recon_quantized=0 (only "
                                  "through the LM, as released)", {"loss.recon_quantized": 0.0}),
}
DEFAULT_VARIANTS = ("lqae", "vqvae", "no_refill")

# The study's settings; --steps, --seeds, --frozen_episodes, --max_images override. frozen_cells
# and proto_cells: the (ways, shots) columns of the table. Cost, measured as CPU seconds on a
# shared 2-core machine (an upper bound for an idle one's wall time): a train step is 0.62 (lqae,
# the LM forward and backward), 0.38 (vqvae: the 11.7M-row Adam update) and 0.24 (no_refill);
# build, compile and the full evaluations ~145 per run; so 3 variants x 3 seeds x 300 steps
# ~ 1,110 + 1,300 = 2,400 s (40 min). --quick: ~210 s for its 3 runs.
SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(steps=300, seeds=3, frozen_episodes=30, frozen_cells=((2, 1), (5, 1)),
                 proto_episodes=200, proto_cells=((5, 1), (5, 5)), probe_epochs=200,
                 recon_batches=4, max_images=0),
    "quick": dict(steps=20, seeds=1, frozen_episodes=3, frozen_cells=((2, 1), (5, 1)),
                  proto_episodes=40, proto_cells=((5, 1), (5, 5)), probe_epochs=20,
                  recon_batches=1, max_images=150),
}
EVALS = ("reconstruction", "fewshot", "fewshot_frozen", "linear_probe")


def load_config(path: str, steps: int) -> ml_collections.ConfigDict:
    """``get_config(steps)`` of the config file at ``path`` (configs/lqae_demo.py)."""
    return common.load_config(path, str(steps), "configs/lqae_demo.py")


def run_config(base: ml_collections.ConfigDict, variant: Variant, seed: int,
               s: dict[str, Any]) -> ml_collections.ConfigDict:
    """The config of one (variant, seed) run: the base config, the study's evaluations, the
    variant's overrides; seed and data order from ``seed`` (the same for every variant)."""
    c = base.copy_and_resolve_references()
    steps = int(s["steps"])
    ways = sorted({w for w, _ in s["proto_cells"]})
    shots = sorted({k for _, k in s["proto_cells"]})
    f_ways = sorted({w for w, _ in s["frozen_cells"]})
    f_shots = sorted({k for _, k in s["frozen_cells"]})
    overrides = {
        "seed": seed, "data.seed": seed, "train.steps": steps,
        "train.checkpoint_every": steps, "train.keep_checkpoints": 1, "train.eval_every": steps,
        "eval.evals": EVALS, "eval.max_images": int(s["max_images"]),
        "eval.num_batches": int(s["recon_batches"]),
        # Evaluated once, on the final checkpoint.
        **{f"eval.{name}.every": 0 for name in EVALS},
        "eval.fewshot.ways": tuple(ways), "eval.fewshot.shots": tuple(shots),
        "eval.fewshot.episodes": int(s["proto_episodes"]),
        "eval.fewshot_frozen.ways": tuple(f_ways), "eval.fewshot_frozen.inner_shots":
            tuple(f_shots), "eval.fewshot_frozen.episodes": int(s["frozen_episodes"]),
        # Exact match of the generation is Frozen's score; the name ranking would cost ways x more.
        "eval.fewshot_frozen.ranking": False,
        "eval.probe.epochs": int(s["probe_epochs"]),
        **variant.overrides,
    }
    common.set_keys(c, overrides)
    return c


# ----------------------------------------------------------------------------------------------
# Metrics: one column each, read from a run's eval JSONs.


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str  # '%' (a fraction shown as a percentage), 'dB' or ''
    value: Callable[[dict, ml_collections.ConfigDict], float | None]  # None: n/a for the run
    chance: Callable[[dict], float | None] = lambda r: None


def metrics_for(s: dict[str, Any]) -> list[Metric]:
    """The table's columns for settings ``s``."""
    out = []
    for w, k in s["frozen_cells"]:
        cell = f"{w}way_{k}shot"
        out.append(Metric(f"frozen_{cell}", f"Frozen {w}-way {k}-shot", "%",
                          lambda r, c, cell=cell: r["fewshot_frozen"][cell]["accuracy"],
                          lambda r, cell=cell: r["fewshot_frozen"][cell]["chance"]))
    for w, k in s["proto_cells"]:
        cell = f"{w}way_{k}shot"
        out.append(Metric(f"proto_{cell}", f"prototypes {w}-way {k}-shot", "%",
                          lambda r, c, cell=cell: r["fewshot"][f"{cell}_accuracy"],
                          lambda r, cell=cell: r["fewshot"][f"{cell}_chance"]))
    out += [
        Metric("probe_top1", "linear probe top-1", "%", lambda r, c: r["linear_probe"]["top1"],
               lambda r: r["linear_probe"]["chance"]),
        Metric("psnr_codes", "PSNR from the codes", "dB",
               lambda r, c: r["reconstruction"]["psnr_quantized"],
               lambda r: r["psnr_mean_image"]),
        # The decoder reads the LM's output only where the loss trains it to.
        Metric("psnr_lm", "PSNR after LM refill", "dB",
               lambda r, c: (r["reconstruction"]["psnr_lm_filled"]
                             if c.loss.recon_lm != 0 else None),
               lambda r: r["psnr_mean_image"]),
        Metric("perplexity", "codebook perplexity", "",
               lambda r, c: r["reconstruction"]["perplexity"]),
    ]
    return out


def mean_image_psnr(config: ml_collections.ConfigDict) -> float:
    """PSNR of the control that outputs the mean training image for every validation image the
    reconstruction evaluation scores (the same images, [0, 1] pixels)."""
    from lqae_vlap.data import sources as sources_lib  # noqa: PLC0415
    from lqae_vlap.evals import reconstruction as recon_lib  # noqa: PLC0415

    splits = sources_lib.open_sources(config.data, config.model.image_size,
                                      supported=("digits", "imagenet"))
    train, val = splits["train_eval"], splits["validation"]
    mean = np.mean([train[i]["image"] for i in range(len(train))], axis=0) / 255.0
    bs, n = int(config.eval.batch_size), int(config.eval.num_batches)
    x = np.stack([val[i % len(val)]["image"] for i in range(bs * n)]).astype(np.float64) / 255.0
    return float(recon_lib.psnr(np.broadcast_to(mean, x.shape), x, data_range=1.0)[1])


# ----------------------------------------------------------------------------------------------
# Running


def markdown_table(study: dict[str, Any]) -> str:
    """The variant x metric table, then the chance / control row."""
    metrics = study["metrics"]
    head = ["variant", *[m["title"] for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in study["variants"]:
        row = [f"{study['variants'][name]['title']} (`{name}`)"]
        row += [common.cell_text(study["summary"][name][m["key"]], m["unit"]) for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    control = ["chance / control"]
    for m in metrics:
        c = study["chance"].get(m["key"])
        text = "—" if c is None else f"{common.fmt(c, m['unit'])}{common.suffix(m['unit'])}"
        if m["key"] == "probe_top1" and c is not None:
            text = f"majority {text}"
        elif m["unit"] == "dB" and c is not None:
            text = f"mean image {text}"
        shuffled = study["shuffled"].get(m["key"])
        if shuffled is not None:
            text += f" (shuffled words {common.fmt(shuffled, '%')}%)"
        control.append(text)
    lines.append("| " + " | ".join(control) + " |")
    return "\n".join(lines)


def write_outputs(study: dict[str, Any], workdir: str) -> str:
    """study.json, study.md and study.png in workdir; returns the markdown."""
    s = study["settings"]
    table = markdown_table(study)
    md = [f"# LQAE ablation ({study['mode']})", "",
          f"{s['steps']} steps x batch {study['batch_size']} per run, seeds {study['seeds']}, "
          f"config {study['config']}; every cell: mean ± 95% Student-t CI half-width over "
          "seeds (n/a: not trained for it).", "", table, "",
          "Variants:", *[f"- `{k}`: {v['about']}; overrides {v['overrides']}"
                         for k, v in study["variants"].items()], "",
          f"Frozen: open-ended (nonsense names), {s['frozen_episodes']} episodes per cell, "
          f"exact match of SmolLM2's generation; prototypes: {s['proto_episodes']} episodes; "
          f"the released linear probe, {s['probe_epochs']} epochs; PSNR on [0, 1] pixels.",
          f"Time: {study['timing']['wall_s']:.0f} s wall, {study['timing']['cpu_s']:.0f} s CPU "
          f"for {len(study['runs'])} runs.", ""]
    text = "\n".join(md)
    with open(os.path.join(workdir, "study.md"), "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "study.json"), "w") as f:
        json.dump(study, f, indent=1)
    common.write_chart(study, os.path.join(workdir, "study.png"))
    return text


def run_study(workdir: str, *, mode: str, settings: dict[str, Any], variants: Sequence[str],
              config_path: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every (variant, seed) run, then the table; returns the study record (study.json)."""
    from lqae_vlap.methods import lqae  # noqa: PLC0415

    s = settings
    base = load_config(config_path, int(s["steps"]))
    common.check_missing(base, ("model.lm_path", "eval.llm_path"))
    common.claim_workdir(workdir, {"settings": s, "config": config_path})
    metrics = metrics_for(s)
    seeds = list(range(int(s["seeds"])))
    runs, t0, c0 = [], time.time(), common.cpu_seconds()
    chance: dict[str, float] = {}
    shuffled: dict[str, list[float]] = {}
    for name in variants:
        for seed in seeds:
            config = run_config(base, VARIANTS[name], seed, s)
            run_dir = os.path.join(workdir, name, f"seed{seed}")
            log(f"=== study: {name} seed {seed} -> {run_dir}")
            t1, c1 = time.time(), common.cpu_seconds()
            results = common.train_one(config, run_dir, lqae.build, EVALS)
            if "psnr_mean_image" not in chance:
                chance["psnr_mean_image"] = mean_image_psnr(config)
            results["psnr_mean_image"] = chance["psnr_mean_image"]
            values = {m.key: m.value(results, config) for m in metrics}
            for m in metrics:
                if m.chance(results) is not None:
                    chance[m.key] = float(m.chance(results))
                if m.key.startswith("proto_"):
                    cell = m.key[len("proto_"):]
                    shuffled.setdefault(m.key, []).append(
                        results["fewshot"][f"{cell}_shuffled_accuracy"])
            runs.append(dict(variant=name, seed=seed, workdir=run_dir, values=values,
                             wall_s=time.time() - t1, cpu_s=common.cpu_seconds() - c1))
    chance.pop("psnr_mean_image")
    study = dict(
        mode=mode, config=config_path, settings=s, seeds=seeds,
        batch_size=int(base.data.batch_size),
        variants={n: dict(title=VARIANTS[n].title, about=VARIANTS[n].about,
                          overrides={k: (list(v) if isinstance(v, tuple) else v)
                                     for k, v in VARIANTS[n].overrides.items()})
                  for n in variants},
        metrics=[dict(key=m.key, title=m.title, unit=m.unit) for m in metrics],
        runs=runs,
        summary={n: {m.key: common.summarize([r["values"][m.key] for r in runs
                                              if r["variant"] == n])
                     for m in metrics} for n in variants},
        chance=chance, shuffled={k: float(np.mean(v)) for k, v in shuffled.items()},
        timing=dict(wall_s=time.time() - t0, cpu_s=common.cpu_seconds() - c0))
    text = write_outputs(study, workdir)
    log("")
    log(text)
    log(f"wrote {os.path.join(workdir, 'study.md')}, study.json and study.png")
    return study


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lqae_vlap.studies.lqae_ablation",
                                description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="folder for the runs and study.md/json/png")
    p.add_argument("--quick", action="store_true", help="1 seed, few steps, tiny evaluations")
    p.add_argument("--seeds", type=int, help="seeds per variant (full: 3)")
    p.add_argument("--steps", type=int, help="training steps per run (full: 300)")
    p.add_argument("--frozen_episodes", type=int, help="episodes per Frozen few-shot cell")
    p.add_argument("--max_images", type=int, help="images per split the evaluations read (0 all)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the base config file")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> tuple[str, dict[str, Any], list[str]]:
    mode = "quick" if args.quick else "full"
    s = dict(SETTINGS[mode])
    for key in ("seeds", "steps", "frozen_episodes", "max_images"):
        v = getattr(args, key)
        if v is not None:
            if v < (0 if key == "max_images" else 1):
                least = 0 if key == "max_images" else 1
                raise common.StudyError(f"--{key}={v}: must be >= {least}")
            s[key] = v
    variants = common.variants_from(args.variants, VARIANTS)
    return mode, s, variants


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        mode, s, variants = settings_from(args)
        run_study(os.path.abspath(args.workdir), mode=mode, settings=s, variants=variants,
                  config_path=os.path.abspath(args.config))
    return common.guarded_main(body)


if __name__ == "__main__":
    sys.exit(main())
