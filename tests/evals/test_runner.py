"""The evaluation convention: scalars of a result, per-evaluation cadence, and ``run``."""

import json

import ml_collections
import pytest

from lqae_vlap.evals import runner


def test_flat_scalars_keeps_numbers_and_nests_names():
    r = {"a": 1, "b": {"c": 2.5, "skipped": {"x": 1}}, "s": "text", "l": [1], "t": True,
         "protocol": {"epochs": 200, "shots": 4}}
    assert runner.flat_scalars("cap", r) == {"cap/a": 1.0, "cap/b/c": 2.5}


def _config(eval_every=None, **sections):
    c = ml_collections.ConfigDict({"train": {}, "eval": {"evals": tuple(sections)}})
    if eval_every is not None:
        c.train.eval_every = eval_every
    for name, every in sections.items():
        if every is not None:  # None: no section at all
            c.eval[name] = {"every": every, "other_knob": 1}
    return c


def test_cadence_follows_every_with_train_eval_every_as_default():
    c = _config(eval_every=500, loss=-1, captioning=2500, retrieval=0, vqa=None)
    assert runner.cadence(c) == {"loss": 500, "captioning": 2500, "retrieval": 0, "vqa": 500}
    # No train.eval_every: -1 and a missing section mean only at the end.
    assert runner.cadence(_config(loss=-1, vqa=None, captioning=7)) == {
        "loss": 0, "vqa": 0, "captioning": 7}


def _fake_evals(calls):
    def cheap(ctx, step, workdir):
        calls.append(("cheap", ctx, step))
        return {"x": 1.5, "nested": {"y": 2}, "label": "z"}, ["cheap line"]

    def costly(ctx, step, workdir):
        calls.append(("costly", ctx, step))
        return {"score": 0.25}, ["costly line", "second line"]

    return {"cheap": cheap, "costly": costly}


def test_run_writes_json_prints_lines_and_returns_scalars(tmp_path, capsys):
    calls = []
    scalars = runner.run(_fake_evals(calls), ["costly", "cheap"], "ctx", 12, str(tmp_path))
    assert calls == [("costly", "ctx", 12), ("cheap", "ctx", 12)]  # in the order named
    assert scalars == {"costly/score": 0.25, "cheap/x": 1.5, "cheap/nested/y": 2.0}
    assert json.loads((tmp_path / "eval_cheap_000012.json").read_text()) == {
        "step": 12, "x": 1.5, "nested": {"y": 2}, "label": "z"}
    assert json.loads((tmp_path / "eval_costly_000012.json").read_text()) == {
        "step": 12, "score": 0.25}
    assert capsys.readouterr().out.splitlines() == [
        "  costly line", "  second line", "  cheap line"]


def test_run_refuses_unknown_names_before_running_any(tmp_path):
    calls = []
    with pytest.raises(ValueError, match=r"unknown evaluations \['fid'\].*'cheap', 'costly'"):
        runner.run(_fake_evals(calls), ["cheap", "fid"], None, 1, str(tmp_path))
    assert not calls and not list(tmp_path.iterdir())


def test_rows_print_as_one_aligned_table_before_the_notes(tmp_path, capsys):
    def scored(ctx, step, workdir):
        return {"a": 0.5}, [runner.Row("accuracy", runner.pct(0.5), "chance 10.0%"),
                            "an example", runner.Row("a longer metric name", "3.25 dB")]

    runner.run({"scored": scored}, ["scored"], None, 7, str(tmp_path))
    assert capsys.readouterr().out.splitlines() == [
        "  scored @ step 7" + " " * 9 + "value  chance / control",
        "  accuracy" + " " * 16 + "50.0%  chance 10.0%",
        "  a longer metric name  3.25 dB",
        "  an example"]


def test_table_without_controls_has_no_control_header():
    assert runner.table("t", [runner.Row("m", "1")]) == ["t  value", "m      1"]
    assert runner.table("t", []) == []
