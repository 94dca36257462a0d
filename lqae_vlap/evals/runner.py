"""One convention for every method's evaluations: small functions in a plain dict, each with its
own cadence.

An evaluation is ``fn(ctx, step, workdir) -> (result, lines)``: ``ctx`` is the method's context
for this run (its params, frozen tree, jitted pieces and whatever several evaluations share, such
as one pass over the held-out images), ``result`` a JSON-able dict written to
``workdir/eval_<name>_<step>.json`` whose numbers become the scalars ``<name>/<key>/...``, and
``lines`` what a person reads, printed by process 0: ``Row(metric, value, control)`` entries
become one short aligned table (metric | value | chance / control) and strings (examples, notes)
follow it. The console shows only that; every number stays in the JSON, the JSONL and the
TensorBoard files. A method lists its evaluations in a dict (``{'loss': loss, 'captioning':
captioning, ...}``) and ``run`` calls the named ones in order.

Cadence, as big_vision's per-evaluator ``log_steps``: ``config.eval.<name>.every`` steps, where
-1 (the default) means ``config.train.eval_every`` and 0 means only at the end of training and in
``mode=eval``; so beam-search captioning of 5k images need not run as often as the held-out loss.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections

from lqae_vlap.core import files



class Row(NamedTuple):
    """One line of an evaluation's console table; value and control already formatted
    (e.g. '12.3%', '31.20 dB'), control the chance level or control run it is read against."""

    metric: str
    value: str
    control: str = ""


Evaluation = Callable[[Any, int, str], tuple[dict[str, Any], list[str | Row]]]


def pct(x: float, digits: int = 1) -> str:
    """A fraction as a percentage string: 0.1234 -> '12.3%'."""
    return f"{100 * float(x):.{digits}f}%"


def table(title: str, rows: Sequence[Row]) -> list[str]:
    """Rows as aligned text: a header (title | value | chance / control), then one line per row."""
    if not rows:
        return []
    has_control = any(r.control for r in rows)
    head = Row(title, "value", "chance / control" if has_control else "")
    w0 = max(len(r.metric) for r in (head, *rows))
    w1 = max(len(r.value) for r in (head, *rows))
    return [f"{r.metric:<{w0}}  {r.value:>{w1}}  {r.control}".rstrip() for r in (head, *rows)]


def format_lines(title: str, lines: Sequence[str | Row]) -> list[str]:
    """An evaluation's ``lines`` for the console: its rows as one ``table``, then its strings."""
    rows = [x for x in lines if isinstance(x, Row)]
    return table(title, rows) + [str(x) for x in lines if not isinstance(x, Row)]


def check_names(names: Sequence[str], evals: Mapping[str, Evaluation]) -> None:
    """Raises a ValueError naming ``config.eval.evals`` entries that are not in ``evals``."""
    unknown = sorted(set(names) - set(evals))
    if unknown:
        raise ValueError(f"config.eval.evals has unknown evaluations {unknown}; choose from "
                         f"{tuple(evals)}")


def cadence(config: ml_collections.ConfigDict) -> dict[str, int]:
    """{name: every} for each of ``config.eval.evals``, from ``config.eval.<name>.every``.

    -1 or no such key: ``config.train.eval_every`` (0 when that is unset); 0: only at the end.
    """
    default = int(config.train.get("eval_every", 0) or 0)
    out = {}
    for name in config.eval.evals:
        section = config.eval.get(name, None)
        every = section.get("every", -1) if isinstance(section, ml_collections.ConfigDict) else -1
        every = default if every is None or int(every) < 0 else int(every)
        out[name] = every
    return out


def write_eval_json(workdir: str, name: str, step: int, result: Mapping[str, Any]) -> None:
    """``workdir/eval_<name>_<step>.json`` = {"step": step, **result}; process 0 only."""
    if jax.process_index() == 0:
        files.write_text(files.join(workdir, f"eval_{name}_{step:06d}.json"),
                         json.dumps({"step": step, **result}, indent=1))


def flat_scalars(name: str, result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a result as {'name/key/sub': value} (bools, lists and strings left out,
    and the 'skipped', 'predictions' and 'protocol' tables: a protocol's sizes and settings
    describe the number, they are not curves)."""
    out = {}
    for k, v in result.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{name}/{key}"] = float(v)
        elif isinstance(v, Mapping) and k not in ("skipped", "predictions", "protocol"):
            out.update(flat_scalars(name, v, prefix=f"{key}/"))
    return out


def run(evals: Mapping[str, Evaluation], names: Sequence[str], ctx: Any, step: int,
        workdir: str) -> dict[str, float]:
    """Runs ``evals[name](ctx, step, workdir)`` for each name: writes its JSON, prints its table
    and lines (process 0) and returns every evaluation's scalars in one dict."""
    check_names(names, evals)
    scalars: dict[str, float] = {}
    for name in names:
        result, lines = evals[name](ctx, step, workdir)
        write_eval_json(workdir, name, step, result)
        if jax.process_index() == 0:
            for line in format_lines(f"{name} @ step {step}", lines):
                print(f"  {line}", flush=True)
        scalars.update(flat_scalars(name, result))
    return scalars
