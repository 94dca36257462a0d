"""VLAP's central claim at laptop scale: assignment prediction against a captioning-only map.

    python -m lqae_vlap.studies.vlap_ablation --workdir=DIR [--quick] [--seeds=3] [--steps=N]

The data are digit scenes (data/digit_scenes.py): SYNTHETIC compositions of REAL handwritten
digits (scikit-learn's scans, coloured, sized and placed by a seeded generator) captioned from
the scene's ground truth ("a large red seven left of a small blue two"): thousands of distinct
captions, ten digit-colour combinations seen only in the held-out splits, and held-out scenes in
pairs that differ in one digit. The frozen vision encoder was learned WITHOUT captions: the
encoder of this project's LQAE trained on the training scenes' pixels (configs/lqae_scenes.py,
the analogue of VLAP's self-supervised BEiT), trained once into DIR/encoder (or read from
--encoder_workdir) and read by every run as the 'lqae' vision tower. The frozen LLM is the real
SmolLM2-135M-Instruct; the trainable part, as in VLAP, is ONE Dense (configs/vlap_scenes.py).

Variants (``VARIANTS``), equal steps, batch and data order per seed:
  cap_only       the captioning loss alone (loss.map = 0): the LiMBeR-style linear map VLAP
                 compares against;
  vlap           0.1 * L_map + L_cap with the paper's Sinkhorn (optimal transport whose word
                 marginal is the word frequency of the training captions);
  vlap_released  the same with the released code's Sinkhorn (sinkhorn.mode='released_code').

Protocol: each variant's peak learning rate is picked from ``--lrs`` by the validation
captioning loss L_cap (the one loss every variant has; lower is better) of its seed-0 runs;
the grid is reported. The chosen rate's seed-0 run is kept and seeds 1.. are trained at it.
Every run is then scored on the TEST scenes: retrieval Recall@1/5 both ways for every
similarity (word_scores and embedding on galleries of 100 scenes with distinct captions;
caption_likelihood, the LLM's likelihood of each caption after each scene, one pass per pair,
Recall@1 on two galleries of 10), captioning CIDEr and BLEU-4 (greedy), and semantic
arithmetic (image - word(a) + word(b) -> Recall@1/5 of the exact target scene, beside the
controls word(b) alone and the image alone). Controls: chance for each; the untrained map (the
Dense at its seed-0 initialisation, trained with learning rate 0); for captioning, the most
frequent training caption given for every test scene.

Writes to DIR ``study.md`` (the tables, also printed), ``study.json`` (every run's numbers,
the grid, settings, timings) and ``study.png`` (bars with 95% CIs over seeds). Runs live in
``DIR/<variant>/lr<lr>/seed<k>``; the same command resumes a killed study.

``--quick``: 1 seed, one learning rate, a few steps and tiny evaluations: checks the pipeline
and the table's shape in minutes, says nothing about the outcome.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from lqae_vlap.studies import common

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
DEFAULT_CONFIG = os.path.join(_CONFIGS, "vlap_scenes.py")
DEFAULT_ENCODER_CONFIG = os.path.join(_CONFIGS, "lqae_scenes.py")


Variant = common.Variant


VARIANTS: dict[str, Variant] = {
    "cap_only": Variant("captioning only", "L_cap alone (loss.map=0): a LiMBeR-style linear map",
                        {"loss.map": 0.0}),
    "vlap": Variant("VLAP", "0.1 L_map + L_cap, the paper's Sinkhorn (OT, word-frequency "
                    "marginal)", {"sinkhorn.mode": "paper"}),
    "vlap_released": Variant("VLAP, released Sinkhorn", "0.1 L_map + L_cap, the released "
                             "code's Sinkhorn", {"sinkhorn.mode": "released_code"}),
}
DEFAULT_VARIANTS = ("cap_only", "vlap", "vlap_released")
UNTRAINED = "untrained"  # the control run: the seed-0 Dense, learning rate 0

# Cost, measured as CPU seconds on the shared 2-core machine (a 60-step pilot, load 5-6): a
# train step at batch 16 with 11-token captions ~1.9 (the frozen SmolLM2's forward and
# backward); per run ~50 outside the steps (build, compiles, the evaluations; the compilation
# cache saves part of it from the second run on); the encoder's 400 steps (configs/lqae_scenes.py
# without the LM refill) ~200. So the full study, 15 runs of 80 steps and the control, is
# ~3,200 CPU seconds. The grid: a first full run on 3e-3 / 1e-2 / 3e-2 picked the largest for
# the captioning-only map (validation L_cap 5.29 / 3.69 / 1.68), so the grid is one step up.
SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(steps=80, seeds=3, lrs=(1e-2, 3e-2, 1e-1), encoder_steps=400,
                 batch_size=16, loss_batches=2, max_images=200, gallery_size=100,
                 likelihood_gallery_size=10, likelihood_galleries=2, caption_images=64,
                 caption_tokens=12),
    "quick": dict(steps=3, seeds=1, lrs=(1e-2,), encoder_steps=3, batch_size=8,
                  loss_batches=1, max_images=40, gallery_size=20, likelihood_gallery_size=4,
                  likelihood_galleries=1, caption_images=8, caption_tokens=4),
}
EVALS = ("loss", "captioning", "retrieval", "arithmetic")
SIMILARITIES = ("word_scores", "embedding")  # ranked on galleries of gallery_size
# caption_likelihood needs an LLM pass per (scene, caption) pair: its own smaller galleries.
LIKELIHOOD = "caption_likelihood"
MAX_CAPTION_LEN = 11  # "a large red seven left of a small blue two" = 10 SmolLM2 tokens + EOS


# ----------------------------------------------------------------------------------------------
# Configs


def encoder_config(path: str, s: dict[str, Any]) -> ml_collections.ConfigDict:
    """configs/lqae_scenes.py at the study's encoder steps, checkpointed once at the end."""
    c = common.load_config(path, str(int(s["encoder_steps"])), "configs/lqae_scenes.py")
    steps = int(s["encoder_steps"])
    common.set_keys(c, {"train.checkpoint_every": steps, "train.keep_checkpoints": 1,
                        "train.log_every": max(1, steps // 6),
                        "optim.warmup_steps": min(int(c.optim.warmup_steps), max(1, steps // 10)),
                        "eval.num_batches": 1 if steps < 10 else 4})
    return c


def run_config(base: ml_collections.ConfigDict, overrides: dict[str, Any], seed: int, lr: float,
               s: dict[str, Any], encoder_workdir: str) -> ml_collections.ConfigDict:
    """One run: the base config, the study's sizes and evaluations (test scenes), then
    ``overrides`` (a variant's); seed and data order from ``seed`` (alike for every variant)."""
    c = base.copy_and_resolve_references()
    steps = int(s["steps"])
    settings = {
        "seed": seed, "data.seed": seed, "data.batch_size": int(s["batch_size"]),
        "model.max_caption_len": MAX_CAPTION_LEN, "model.vision.workdir": encoder_workdir,
        "model.vision.step": -1, "optim.lr": float(lr),
        "optim.warmup_steps": max(1, steps // 10),
        "train.steps": steps, "train.checkpoint_every": steps, "train.keep_checkpoints": 1,
        "train.eval_every": 0, "train.log_every": max(1, steps // 6),
        "eval.evals": EVALS, "eval.max_images": int(s["max_images"]),
        "eval.batch_size": 32 if int(s["max_images"]) >= 32 else 8,
        "eval.num_batches": int(s["loss_batches"]),  # the 'loss' eval: VALIDATION batches
        # Captioning, retrieval and arithmetic read the TEST scenes.
        "eval.source.name": "digit_scenes", "eval.source.split": "test",
        "eval.captioning.every": -1, "eval.captioning.num_beams": (1,),
        "eval.captioning.max_images": int(s["caption_images"]),
        "eval.captioning.max_new_tokens": int(s["caption_tokens"]),
        "eval.captioning.metrics": ("BLEU-4", "CIDEr"),
        "eval.retrieval.similarities": (*SIMILARITIES, LIKELIHOOD),
        "eval.retrieval.gallery_size": int(s["gallery_size"]), "eval.retrieval.ks": (1, 5),
        "eval.retrieval.likelihood_gallery_size": int(s["likelihood_gallery_size"]),
        "eval.retrieval.likelihood_galleries": int(s["likelihood_galleries"]),
        "eval.retrieval.max_pairs": int(s["likelihood_gallery_size"]) ** 2,
        "eval.arithmetic.ks": (1, 5),
        **overrides,
    }
    common.set_keys(c, settings)
    return c


# ----------------------------------------------------------------------------------------------
# Metrics: one column each, read from a run's eval JSONs.


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str  # '%' (a fraction shown as a percentage) or '' (plain)
    value: Callable[[dict], float]
    chance: Callable[[dict], float | None] = lambda r: None


def _retrieval(sim: str, way: str, k: int) -> Metric:
    arrow = "image->text" if way == "i2t" else "text->image"
    key = f"{way}_R@{k}"
    return Metric(f"{sim}_{way}_r{k}", f"{sim} {arrow} R@{k}", "%",
                  lambda r: r["retrieval"][sim][key], lambda r: r["retrieval"]["chance"][key])


def _likelihood(way: str) -> Metric:
    arrow = "image->text" if way == "i2t" else "text->image"
    key = f"{way}_R@1"
    return Metric(f"{LIKELIHOOD}_{way}_r1", f"{LIKELIHOOD} {arrow} R@1 (small galleries)", "%",
                  lambda r: r["retrieval"][LIKELIHOOD][key],
                  lambda r: r["retrieval"][f"{LIKELIHOOD}_chance"][key])


METRICS: tuple[Metric, ...] = (
    *(_retrieval(sim, way, k) for sim in SIMILARITIES for way in ("i2t", "t2i") for k in (1, 5)),
    _likelihood("i2t"), _likelihood("t2i"),
    Metric("cider", "CIDEr", "", lambda r: 100 * r["captioning"]["greedy"]["CIDEr"]),
    Metric("bleu4", "BLEU-4", "", lambda r: 100 * r["captioning"]["greedy"]["BLEU-4"]),
    *(Metric(f"arith_r{k}", f"arithmetic R@{k}", "%",
             lambda r, k=k: r["arithmetic"]["target"]["arithmetic"][f"R@{k}"],
             lambda r, k=k: r["arithmetic"]["target"]["chance"][f"R@{k}"]) for k in (1, 5)),
    Metric("arith_image_r1", "arithmetic control: image alone R@1", "%",
           lambda r: r["arithmetic"]["target"]["image_only"]["R@1"]),
    Metric("arith_word_r1", "arithmetic control: word(b) alone R@1", "%",
           lambda r: r["arithmetic"]["target"]["word_only"]["R@1"]),
    Metric("val_cap", "validation L_cap", "", lambda r: r["loss"]["cap"]),
)


def pick_lr(validation_cap: dict[float, float | None]) -> float:
    """The learning rate of the lowest validation L_cap; a diverged (None) or non-finite loss
    never wins; ties go to the smaller rate."""
    def key(lr: float) -> tuple[bool, float, float]:
        v = validation_cap[lr]
        bad = v is None or not math.isfinite(v)
        return bad, math.inf if bad else v, lr
    return min(validation_cap, key=key)


def constant_caption_control(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """CIDEr and BLEU-4 (x 100) of giving the most frequent training caption for every test
    scene the captioning evaluation scores (the same scenes and references)."""
    from lqae_vlap.data import sources as sources_lib  # noqa: PLC0415
    from lqae_vlap.evals import captioning as captioning_lib  # noqa: PLC0415

    splits = sources_lib.open_sources(config.data, int(config.model.image_size))
    caption, count = collections.Counter(splits["train"].captions).most_common(1)[0]
    test = splits[config.eval.source.split]
    n = min(len(test), int(config.eval.captioning.max_images),
            int(config.eval.max_images) or len(test))
    refs = {i: captioning_lib.references(test.fields_without_image(i)) for i in range(n)}
    scored = captioning_lib.caption_metrics({i: caption for i in refs}, refs,
                                            metrics=("BLEU-4", "CIDEr"))["scores"]
    return {"caption": caption, "train_count": count, "num_images": n,
            "cider": 100 * scored["CIDEr"], "bleu4": 100 * scored["BLEU-4"]}


# ----------------------------------------------------------------------------------------------
# Tables


def _lr_text(lr: float) -> str:
    return f"{lr:g}"


def markdown_tables(study: dict[str, Any]) -> str:
    """Test metrics (variant rows, then the chance and control rows), then the grid."""
    metrics = study["metrics"]
    head = ["variant (lr)", *[m["title"] for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in study["variants"].items():
        row = [f"{v['title']} (`{name}`, lr {_lr_text(v['lr'])})"]
        row += [common.cell_text(study["summary"][name][m["key"]], m["unit"]) for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    chance, control = study["chance"], study["constant_caption"]
    row = ["chance / constant caption"]
    for m in metrics:
        if m["key"] in chance:
            row.append(f"{common.fmt(chance[m['key']], m['unit'])}{common.suffix(m['unit'])}")
        elif m["key"] in ("cider", "bleu4"):
            row.append(f"{control[m['key']]:.1f}")
        else:
            row.append("—")
    lines.append("| " + " | ".join(row) + " |")
    untrained = study["untrained"]
    row = ["untrained map (seed 0, lr 0)"] + [
        common.fmt(untrained[m["key"]], m["unit"]) + common.suffix(m["unit"]) for m in metrics]
    lines.append("| " + " | ".join(row) + " |")
    grid = ["| variant | " + " | ".join(f"lr {_lr_text(lr)}" for lr in study["settings"]["lrs"])
            + " |", "|---|" + "---|" * len(study["settings"]["lrs"])]
    for name, v in study["variants"].items():
        cells = []
        for lr in study["settings"]["lrs"]:
            g = study["grid"][name][_lr_text(lr)]
            mark = " **(chosen)**" if lr == v["lr"] else ""
            cells.append("diverged" if g.get("diverged") else
                         f"L_cap {g['cap']:.4f}, L_map {g['map']:.4f}{mark}")
        grid.append(f"| {v['title']} (`{name}`) | " + " | ".join(cells) + " |")
    return "\n".join(["Test scenes:", "", *lines, "",
                      "Learning-rate grid (seed 0, validation scenes; chosen by L_cap):", "",
                      *grid])


def write_outputs(study: dict[str, Any], workdir: str) -> str:
    """study.json, study.md and study.png in workdir; returns the markdown."""
    s = study["settings"]
    cc = study["constant_caption"]
    text = "\n".join([
        f"# VLAP ablation on digit scenes ({study['mode']})", "",
        "Data: digit scenes, SYNTHETIC compositions of REAL handwritten digits (scikit-learn's "
        "scans), captioned from each scene's ground truth. Vision: the frozen encoder of an "
        f"LQAE trained {s['encoder_steps']} steps on the training scenes' pixels (no captions); "
        "LLM: the real SmolLM2-135M-Instruct, frozen; trained: one Dense.", "",
        f"{s['steps']} steps x batch {s['batch_size']} per run, seeds {study['seeds']}; every "
        "cell: mean ± 95% Student-t CI half-width over seeds. Retrieval: galleries of "
        f"{s['gallery_size']} test scenes with distinct captions ({s['max_images']} scenes), "
        f"caption_likelihood on {s['likelihood_galleries']} galleries of "
        f"{s['likelihood_gallery_size']} (an LLM pass per pair); "
        f"captioning: greedy, {cc['num_images']} test scenes, x 100; arithmetic: exact "
        "targets among the other evaluated test scenes.", "",
        markdown_tables(study), "",
        "Variants:", *[f"- `{k}`: {v['about']}; overrides {v['overrides']}"
                       for k, v in study["variants"].items()],
        f"- constant caption: {cc['caption']!r} (the most frequent training caption, "
        f"{cc['train_count']} times) for every scene.", "",
        f"Time: {study['timing']['wall_s']:.0f} s wall, {study['timing']['cpu_s']:.0f} s CPU "
        f"for {len(study['runs'])} runs and the encoder.", ""])
    with open(os.path.join(workdir, "study.md"), "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "study.json"), "w") as f:
        json.dump(study, f, indent=1)
    common.write_chart(study, os.path.join(workdir, "study.png"), dashed={
        **study["chance"], "cider": cc["cider"], "bleu4": cc["bleu4"]})
    return text


# ----------------------------------------------------------------------------------------------
# Running


def _values(results: dict[str, Any]) -> dict[str, float]:
    return {m.key: float(m.value(results)) for m in METRICS}


def run_study(workdir: str, *, mode: str, settings: dict[str, Any], variants: Sequence[str],
              config_path: str, encoder_config_path: str, encoder_workdir: str = "",
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """The encoder, the grid, the seeds, the control; then the tables. Returns study.json's
    record."""
    from lqae_vlap.methods import lqae, vlap  # noqa: PLC0415
    from lqae_vlap.train import trainer  # noqa: PLC0415

    s = settings
    base = common.load_config(config_path, str(int(s["steps"])), "configs/vlap_scenes.py")
    common.check_missing(base, ("model.llm_path",))
    if float(base.optim.weight_decay):  # before any run: the control is the last one
        raise common.StudyError("the untrained-map control needs optim.weight_decay=0 in "
                                f"{config_path} (decay would move the Dense at lr 0)")
    enc_config = encoder_config(encoder_config_path, s)
    common.check_missing(enc_config, ("model.lm_path",))
    common.claim_workdir(workdir, {"settings": s, "config": config_path,
                                   "encoder_config": encoder_config_path,
                                   "encoder_workdir": encoder_workdir})
    t0, c0 = time.time(), common.cpu_seconds()
    enc_dir = encoder_workdir or os.path.join(workdir, "encoder")
    log(f"=== study: the frozen encoder (LQAE on the scenes' pixels) -> {enc_dir}")
    trainer.train_and_evaluate(enc_config, enc_dir, lqae.build)  # a finished one: a notice
    encoder_time = dict(wall_s=time.time() - t0, cpu_s=common.cpu_seconds() - c0)

    runs: list[dict[str, Any]] = []

    def run(name: str, overrides: dict[str, Any], seed: int, lr: float,
            grid_run: bool = False) -> dict[str, Any] | None:
        """One run's eval JSONs; None for a grid run that diverged (its rate is not chosen)."""
        config = run_config(base, overrides, seed, lr, s, enc_dir)
        run_dir = os.path.join(workdir, name, f"lr{_lr_text(lr)}", f"seed{seed}")
        log(f"=== study: {name} lr {_lr_text(lr)} seed {seed} -> {run_dir}")
        t1, c1 = time.time(), common.cpu_seconds()
        try:
            results = common.train_one(config, run_dir, vlap.build, EVALS)
        except trainer.TrainingDiverged as e:
            if not grid_run:
                raise
            log(f"=== study: {name} lr {_lr_text(lr)} diverged, not a candidate: {e}")
            return None
        runs.append(dict(variant=name, seed=seed, lr=lr, workdir=run_dir,
                         values=_values(results), wall_s=time.time() - t1,
                         cpu_s=common.cpu_seconds() - c1))
        return results

    chosen: dict[str, float] = {}
    grid: dict[str, dict[str, dict[str, float]]] = {}
    chance: dict[str, float] = {}
    for name in variants:
        overrides = VARIANTS[name].overrides
        grid[name] = {}
        for lr in s["lrs"]:
            results = run(name, overrides, 0, lr, grid_run=True)
            if results is None:
                grid[name][_lr_text(lr)] = {"cap": None, "map": None, "diverged": True}
                continue
            grid[name][_lr_text(lr)] = {k: float(results["loss"][k]) for k in ("cap", "map")}
            for m in METRICS:
                if m.chance(results) is not None:
                    chance[m.key] = float(m.chance(results))
        chosen[name] = pick_lr({lr: grid[name][_lr_text(lr)]["cap"] for lr in s["lrs"]})
        if grid[name][_lr_text(chosen[name])].get("diverged"):
            raise common.StudyError(f"{name}: every learning rate of --lrs diverged; give "
                                    "lower ones")
        log(f"=== study: {name}: lr {_lr_text(chosen[name])} chosen by validation L_cap "
            "(" + ", ".join(f"{k}: " + ("diverged" if v.get("diverged") else f"{v['cap']:.4f}")
                            for k, v in grid[name].items()) + ")")
        for seed in range(1, int(s["seeds"])):
            run(name, overrides, seed, chosen[name])
    # One step at learning rate 0 leaves the seed-0 initialisation (AdamW's step is lr times
    # its direction; no weight decay here) and gives it the same evaluations.
    untrained = _values(run(UNTRAINED, {"train.steps": 1, "train.checkpoint_every": 1,
                                        "optim.warmup_steps": 0}, 0, 0.0))
    kept = [r for r in runs if r["variant"] in chosen and r["lr"] == chosen[r["variant"]]]
    constant = constant_caption_control(run_config(base, {}, 0, 0.0, s, enc_dir))
    study = dict(
        mode=mode, config=config_path, encoder_config=encoder_config_path, encoder_dir=enc_dir,
        settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
        seeds=list(range(int(s["seeds"]))),
        variants={n: dict(title=VARIANTS[n].title, about=VARIANTS[n].about, lr=chosen[n],
                          overrides=dict(VARIANTS[n].overrides)) for n in variants},
        metrics=[dict(key=m.key, title=m.title, unit=m.unit) for m in METRICS],
        runs=runs, grid=grid,
        summary={n: {m.key: common.summarize([r["values"][m.key] for r in kept
                                              if r["variant"] == n]) for m in METRICS}
                 for n in variants},
        chance=chance, untrained=untrained, constant_caption=constant,
        timing=dict(wall_s=time.time() - t0, cpu_s=common.cpu_seconds() - c0,
                    encoder=encoder_time))
    text = write_outputs(study, workdir)
    log("")
    log(text)
    log(f"wrote {os.path.join(workdir, 'study.md')}, study.json and study.png")
    return study


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lqae_vlap.studies.vlap_ablation",
                                description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="folder for the runs and study.md/json/png")
    p.add_argument("--quick", action="store_true", help="1 seed, few steps, tiny evaluations")
    p.add_argument("--seeds", type=int, help="seeds per variant (full: 3)")
    p.add_argument("--steps", type=int, help=f"training steps per run (full: "
                   f"{SETTINGS['full']['steps']})")
    p.add_argument("--lrs", help="comma-separated learning-rate grid (full: "
                   f"{','.join(_lr_text(x) for x in SETTINGS['full']['lrs'])})")
    p.add_argument("--encoder_steps", type=int, help="LQAE encoder steps (full: "
                   f"{SETTINGS['full']['encoder_steps']})")
    p.add_argument("--encoder_workdir", default="",
                   help="a finished configs/lqae_scenes.py workdir to use as the frozen encoder "
                   "(default: train one into WORKDIR/encoder)")
    p.add_argument("--compilation_cache", default="",
                   help="JAX's persistent compilation cache folder (default WORKDIR/jax_cache; "
                   "'none': off). The runs compile the same evaluations and, per variant and "
                   "rate, the same train step: each is compiled once")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the VLAP config file")
    p.add_argument("--encoder_config", default=DEFAULT_ENCODER_CONFIG,
                   help="the encoder's LQAE config file")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> tuple[str, dict[str, Any], list[str]]:
    mode = "quick" if args.quick else "full"
    s = dict(SETTINGS[mode])
    for key in ("seeds", "steps", "encoder_steps"):
        v = getattr(args, key)
        if v is not None:
            if v < 1:
                raise common.StudyError(f"--{key}={v}: must be >= 1")
            s[key] = v
    if args.lrs is not None:
        try:
            lrs = tuple(float(x) for x in args.lrs.split(",") if x.strip())
        except ValueError:
            lrs = ()
        if not lrs or any(not (math.isfinite(x) and x > 0) for x in lrs):
            raise common.StudyError(f"--lrs={args.lrs}: give positive learning rates separated "
                                    "by commas, e.g. --lrs=3e-3,1e-2")
        s["lrs"] = lrs
    variants = common.variants_from(args.variants, VARIANTS)
    return mode, s, variants


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        mode, s, variants = settings_from(args)
        cache = args.compilation_cache or os.path.join(os.path.abspath(args.workdir), "jax_cache")
        if cache != "none":
            import jax  # noqa: PLC0415

            # Keyed by the program's HLO and the compiler: a hit is the same executable.
            jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        run_study(os.path.abspath(args.workdir), mode=mode, settings=s, variants=variants,
                  config_path=os.path.abspath(args.config),
                  encoder_config_path=os.path.abspath(args.encoder_config),
                  encoder_workdir=(os.path.abspath(args.encoder_workdir) if args.encoder_workdir
                                   else ""))
    return common.guarded_main(body)


if __name__ == "__main__":
    sys.exit(main())
