"""What every study shares: its config file, its settings record, the cells (mean and 95% CI over
seeds) and their text, and the bar chart of a study record."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import resource
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections


class StudyError(ValueError):
    """Bad input to a study: the message names the flag or file and the fix."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of a study: its title, what it is, and the config keys it sets."""
    title: str
    about: str
    overrides: dict[str, Any]


def load_config(path: str, arg: str | None, what: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file at ``path``; ``what`` names the file it should be."""
    if not os.path.isfile(path):
        raise StudyError(f"--config={path}: no such file; pass the path of {what}")
    spec = importlib.util.spec_from_file_location("_study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """config[a][b][c] = value for key 'a.b.c'; a key the config lacks is a StudyError."""
    node = config
    *path, last = key.split(".")
    for p in path:
        if p not in node:
            raise StudyError(f"the study sets config key {key!r}, which the config lacks")
        node = node[p]
    if last not in node:
        raise StudyError(f"the study sets config key {key!r}, which the config lacks")
    node[last] = value


def set_keys(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    """``set_key`` for each 'a.b.c': value of ``values``, in order."""
    for key, value in values.items():
        set_key(config, key, value)


def get_key(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for p in key.split("."):
        node = node[p]
    return node


def check_missing(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """Stops on a path the config marks 'MISSING: <install command>' (a package not installed)."""
    for key in keys:
        value = str(get_key(config, key))
        if value.startswith("MISSING"):
            raise StudyError(f"config.{key}: {value[len('MISSING: '):]}")


def claim_workdir(workdir: str, mine: dict[str, Any]) -> None:
    """Records the study's settings in workdir/study_settings.json, or checks that the study
    already there has the same (a killed study resumes; other settings are refused)."""
    os.makedirs(workdir, exist_ok=True)
    record = os.path.join(workdir, "study_settings.json")
    mine = json.loads(json.dumps(mine))
    if os.path.isfile(record):
        with open(record) as f:
            theirs = json.load(f)
        if theirs != mine:
            raise StudyError(f"--workdir={workdir} holds a study with other settings "
                             f"({theirs}); use a new --workdir or the same flags")
    else:
        with open(record, "w") as f:
            json.dump(mine, f, indent=1)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """mean, ci95 (Student-t half-width; None for one seed) and n of the non-None values."""
    from lqae_vlap.evals import stats  # noqa: PLC0415

    got = [float(v) for v in values if v is not None]
    if not got:
        return {"mean": None, "ci95": None, "n": 0, "values": list(values)}
    mean, half = stats.mean_confidence_interval(got)
    return {"mean": mean, "ci95": None if math.isnan(half) else half, "n": len(got),
            "values": list(values)}


def fmt(x: float | None, unit: str) -> str:
    """A number in its unit: '%' (a fraction shown as a percentage), 'dB', or '' (plain)."""
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}" if unit == "%" else (f"{x:.2f}" if unit == "dB" else f"{x:.1f}")


def suffix(unit: str) -> str:
    return {"%": "%", "dB": " dB"}.get(unit, "")


def cell_text(cell: dict[str, Any], unit: str) -> str:
    """'45.2 ± 3.1%' (mean ± 95% CI half-width), '45.2% (n=1)' or 'n/a'."""
    if cell["mean"] is None:
        return "n/a"
    if cell["ci95"] is None:
        return f"{fmt(cell['mean'], unit)}{suffix(unit)} (n={cell['n']})"
    return f"{fmt(cell['mean'], unit)} ± {fmt(cell['ci95'], unit)}{suffix(unit)}"


def write_chart(study: dict[str, Any], path: str, dashed: dict[str, float] | None = None) -> None:
    """One panel per metric of a study record (its 'metrics', 'variants', 'summary' and
    'chance'), one bar per variant with its 95% CI, dashed at ``dashed[key]`` (default the
    study's chance); a PNG at ``path``."""
    dashed = study["chance"] if dashed is None else dashed
    from lqae_vlap.studies import chart  # noqa: PLC0415

    panels = []
    for m in study["metrics"]:
        scale = 100.0 if m["unit"] == "%" else 1.0
        cells = [study["summary"][n][m["key"]] for n in study["variants"]]
        chance = dashed.get(m["key"])
        panels.append(dict(
            title=m["title"] + (" (%)" if m["unit"] == "%" else f" ({m['unit']})" if m["unit"]
                                else ""),
            means=[math.nan if c["mean"] is None else scale * c["mean"] for c in cells],
            halfwidths=[math.nan if c["ci95"] is None else scale * c["ci95"] for c in cells],
            chance=None if chance is None else scale * chance))
    chart.bar_chart(path, list(study["variants"]), panels,  # short names fit under the bars
                    note=f"mean and 95% CI over seeds {study['seeds']}; dashed: chance / control")


def read_results(workdir: str, steps: int, evals: Sequence[str]) -> dict[str, Any] | None:
    """{eval name: its JSON} of a run finished at ``steps``, or None if any is missing."""
    out = {}
    for name in evals:
        path = os.path.join(workdir, f"eval_{name}_{steps:06d}.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            out[name] = json.load(f)
    return out


def train_one(config: ml_collections.ConfigDict, workdir: str, build: Callable,
              evals: Sequence[str]) -> dict[str, Any]:
    """Trains (or resumes) one run with the project's trainer; returns its eval JSONs (a run
    that finished before is read back, not retrained)."""
    from lqae_vlap.train import trainer  # noqa: PLC0415

    steps = int(config.train.steps)
    done = read_results(workdir, steps, evals)
    if done is None:
        trainer.train_and_evaluate(config, workdir, build)
        done = read_results(workdir, steps, evals)
    if done is None:
        raise StudyError(f"{workdir} finished training but lacks eval_*_{steps:06d}.json; "
                         "delete that folder and run the study again")
    return done


def variants_from(text: str, known: Mapping[str, Any]) -> list[str]:
    """'a,b' -> ['a', 'b'], each one of ``known``."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in known]
    if unknown or not variants:
        raise StudyError(f"--variants={text}: unknown {unknown}; choose from "
                         f"{', '.join(known)}")
    return variants


def guarded_main(body: Callable[[], None]) -> int:
    """Runs a study's ``body`` with orbax's INFO logs off; bad input, a broken checkpoint or
    workdir and a run that diverged end in one line on stderr and exit status 2."""
    from absl import logging as absl_logging  # noqa: PLC0415

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    from lqae_vlap.train.checkpoint import CheckpointError  # noqa: PLC0415
    from lqae_vlap.train.trainer import TrainingDiverged  # noqa: PLC0415
    from lqae_vlap.train.workdir import WorkdirError  # noqa: PLC0415

    try:
        body()
    except (ValueError, FileNotFoundError, KeyError, CheckpointError, WorkdirError,
            TrainingDiverged) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    return 0
