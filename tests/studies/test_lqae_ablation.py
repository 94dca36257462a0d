"""The LQAE ablation study end to end at its smallest (--quick, 2 steps): the real digits, the real
MiniLM codebook and SmolLM2; checks the table's shape, not the outcome."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from lqae_vlap.studies import lqae_ablation
from tests.helpers import minilm_dir, run_cli, smollm2_dir


def _run(*args):
    return run_cli(*args, timeout=900, module="lqae_vlap.studies.lqae_ablation")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    minilm_dir(), smollm2_dir()  # fail with the install command if they are missing
    workdir = tmp_path_factory.mktemp("study")
    args = (f"--workdir={workdir}", "--quick", "--steps=2", "--max_images=60",
            "--frozen_episodes=2")
    done = _run(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return workdir, done, args


def test_quick_study_writes_the_table_json_and_chart(quick):
    workdir, done, _ = quick
    study = json.loads((workdir / "study.json").read_text())
    assert list(study["variants"]) == ["lqae", "vqvae", "no_refill"]
    keys = [m["key"] for m in study["metrics"]]
    assert keys == ["frozen_2way_1shot", "frozen_5way_1shot", "proto_5way_1shot",
                    "proto_5way_5shot", "probe_top1", "psnr_codes", "psnr_lm", "perplexity"]
    assert len(study["runs"]) == 3 and {r["seed"] for r in study["runs"]} == {0}
    for name in study["variants"]:
        for key in keys:
            cell = study["summary"][name][key]
            assert {"mean", "ci95", "n", "values"} <= set(cell)
            if key == "psnr_lm" and name != "lqae":  # its decoder never reads the LM's output
                assert cell["mean"] is None and cell["n"] == 0
            else:
                assert cell["n"] == 1 and np.isfinite(cell["mean"]) and cell["ci95"] is None
    assert study["chance"]["frozen_5way_1shot"] == pytest.approx(0.2)
    assert study["chance"]["proto_5way_1shot"] == pytest.approx(0.2)
    assert 0 < study["chance"]["probe_top1"] < 1 and study["chance"]["psnr_codes"] > 0
    # Every run trained the same steps and data with the trainer and evaluated its last step.
    for r in study["runs"]:
        cfg = json.loads(open(os.path.join(r["workdir"], "config.json")).read())
        assert cfg["train"]["steps"] == 2 and cfg["data"]["seed"] == 0
        assert os.path.isfile(os.path.join(r["workdir"], "eval_fewshot_frozen_000002.json"))
    learned = json.loads(open(os.path.join(workdir, "vqvae", "seed0", "config.json")).read())
    assert learned["quantizer"]["codebook"] == "learned" and learned["loss"]["recon_lm"] == 0

    md = (workdir / "study.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 + 1  # header, rule, 3 variants, chance / control
    assert all(line.count("|") == len(keys) + 2 for line in table)
    assert table[2].startswith("| LQAE (`lqae`)") and table[-1].startswith("| chance / control")
    assert "(n=1)" in table[2] and "n/a" in table[3]
    assert table[2] in done.stdout  # the table is printed too
    png = np.asarray(Image.open(workdir / "study.png").convert("RGB"))
    assert png.shape[0] > 200 and png.shape[1] > 600 and png.std() > 0


def test_rerun_reads_the_finished_runs_back(quick):
    """The same command again trains nothing (the trainer's finished-workdir notice) and writes
    the same numbers; other settings in the same workdir are refused in one line."""
    workdir, _, args = quick
    before = json.loads((workdir / "study.json").read_text())
    again = _run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "step 2/2" not in again.stdout
    after = json.loads((workdir / "study.json").read_text())
    assert after["summary"] == before["summary"]
    other = _run(f"--workdir={workdir}", "--quick", "--steps=3")
    assert other.returncode == 2 and other.stderr.startswith("error: --workdir=")
    assert "Traceback" not in other.stderr and len(other.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,match", [
    (["--variants=lqae,vq"], "--variants=lqae,vq: unknown ['vq']"),
    (["--seeds=0"], "--seeds=0: must be >= 1"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, match):
    assert lqae_ablation.main([f"--workdir={tmp_path}", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)  # nothing written for bad input
