"""The VLAP ablation study end to end at its smallest (--quick, 2 steps, a 2-step encoder): digit
scenes, the real SmolLM2 and MiniLM; checks the tables' shape and the protocol, not the outcome."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from lqae_vlap.studies import vlap_ablation
from lqae_vlap.train import trainer
from tests.helpers import minilm_dir, run_cli, smollm2_dir


def _run(*args):
    return run_cli(*args, timeout=900, module="lqae_vlap.studies.vlap_ablation")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    minilm_dir(), smollm2_dir()  # fail with the install command if they are missing
    workdir = tmp_path_factory.mktemp("vlap_study")
    args = (f"--workdir={workdir}", "--quick", "--steps=2", "--encoder_steps=2")
    done = _run(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return workdir, done, args


def _config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def test_quick_study_writes_the_tables_json_and_chart(quick):
    workdir, done, _ = quick
    study = json.loads((workdir / "study.json").read_text())
    assert list(study["variants"]) == ["cap_only", "vlap", "vlap_released"]
    keys = [m["key"] for m in study["metrics"]]
    assert keys[:8] == [f"{sim}_{way}_r{k}" for sim in ("word_scores", "embedding")
                        for way in ("i2t", "t2i") for k in (1, 5)]
    assert keys[8:] == ["caption_likelihood_i2t_r1", "caption_likelihood_t2i_r1", "cider",
                        "bleu4", "arith_r1", "arith_r5", "arith_image_r1", "arith_word_r1",
                        "val_cap"]
    # One run per variant (one lr, one seed) and the untrained control.
    assert [r["variant"] for r in study["runs"]] == ["cap_only", "vlap", "vlap_released",
                                                     "untrained"]
    for name in study["variants"]:
        assert study["variants"][name]["lr"] == 1e-2
        for key in keys:
            cell = study["summary"][name][key]
            assert cell["n"] == 1 and np.isfinite(cell["mean"]) and cell["ci95"] is None
    # Galleries of 20 scenes with distinct captions: R@1 chance 1/20, R@5 5/20.
    assert study["chance"]["word_scores_i2t_r1"] == pytest.approx(0.05)
    assert study["chance"]["embedding_t2i_r5"] == pytest.approx(0.25)
    # caption_likelihood: its own gallery of 4 (an LLM pass per pair).
    assert study["chance"]["caption_likelihood_t2i_r1"] == pytest.approx(0.25)
    assert 0 < study["chance"]["arith_r1"] < study["chance"]["arith_r5"] < 1
    assert set(study["untrained"]) == set(keys)
    cc = study["constant_caption"]
    assert cc["caption"].startswith("a ") and cc["train_count"] >= 1 and cc["num_images"] == 8
    assert math.isfinite(cc["cider"]) and math.isfinite(cc["bleu4"])

    # The protocol each run was given: its variant's loss and Sinkhorn, the study's caption
    # length, the TEST scenes for the evaluations, one shared encoder.
    runs = {r["variant"]: r["workdir"] for r in study["runs"]}
    cfg = {name: _config(path) for name, path in runs.items()}
    assert cfg["cap_only"]["loss"]["map"] == 0.0 and cfg["vlap"]["loss"]["map"] == 0.1
    assert cfg["vlap"]["sinkhorn"]["mode"] == "paper"
    assert cfg["vlap_released"]["sinkhorn"]["mode"] == "released_code"
    assert cfg["untrained"]["optim"]["lr"] == 0.0 and cfg["untrained"]["train"]["steps"] == 1
    for name, c in cfg.items():
        assert c["eval"]["source"] == {"name": "digit_scenes", "split": "test", "path": ""}
        assert c["model"]["max_caption_len"] == 11 and c["data"]["seed"] == 0
        assert c["model"]["vision"]["workdir"] == str(workdir / "encoder")
        assert c["train"]["steps"] == (1 if name == "untrained" else 2)
    retrieval = json.loads(open(os.path.join(runs["vlap"], "eval_retrieval_000002.json")).read())
    assert retrieval["protocol"]["dataset"] == "digit_scenes"
    assert retrieval["protocol"]["split"] == "test"
    assert retrieval["protocol"]["likelihood_galleries"] == {"galleries": 1,
                                                           "gallery_images": 4}
    assert json.loads((workdir / "encoder" / "config.json").read_text())["train"]["steps"] == 2

    md = (workdir / "study.md").read_text()
    assert "SYNTHETIC compositions of REAL handwritten digits" in md
    tables = [line for line in md.splitlines() if line.startswith("|")]
    main, grid = tables[:7], tables[7:]
    assert len(main) == 2 + 3 + 2 and len(grid) == 2 + 3
    assert all(line.count("|") == len(keys) + 2 for line in main)
    assert main[2].startswith("| captioning only (`cap_only`, lr 0.01)")
    assert main[5].startswith("| chance / constant caption")
    assert main[6].startswith("| untrained map (seed 0, lr 0)")
    assert "**(chosen)**" in grid[2] and grid[0] == "| variant | lr 0.01 |"
    assert main[3] in done.stdout and grid[3] in done.stdout  # the tables are printed too
    png = np.asarray(Image.open(workdir / "study.png").convert("RGB"))
    assert png.shape[0] > 200 and png.shape[1] > 600 and png.std() > 0


def test_rerun_reads_the_finished_runs_back(quick):
    workdir, _, args = quick
    before = json.loads((workdir / "study.json").read_text())
    again = _run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "step 2/2" not in again.stdout  # nothing trained again
    after = json.loads((workdir / "study.json").read_text())
    assert after["summary"] == before["summary"] and after["untrained"] == before["untrained"]
    other = _run(f"--workdir={workdir}", "--quick", "--steps=3")
    assert other.returncode == 2 and other.stderr.startswith("error: --workdir=")
    assert "Traceback" not in other.stderr and len(other.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,match", [
    (["--variants=vlap,limber"], "--variants=vlap,limber: unknown ['limber']"),
    (["--lrs=fast"], "--lrs=fast: give positive learning rates"),
    (["--lrs=1e-2,-1"], "--lrs=1e-2,-1: give positive"),
    (["--steps=0"], "--steps=0: must be >= 1"),
    (["--config=/nonexistent/vlap.py"], "--config=/nonexistent/vlap.py: no such file"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, match):
    assert vlap_ablation.main([f"--workdir={tmp_path}", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)  # nothing written for bad input


def test_weight_decay_is_refused_before_any_run(tmp_path, capsys):
    """The untrained-map control (lr 0, the last run) needs weight decay 0: a config with decay
    stops the study at the start, not after the 15 training runs."""
    config = tmp_path / "decayed.py"
    config.write_text(
        "from lqae_vlap import config_files\n\n\ndef get_config(arg=None):\n"
        f"    c = config_files.load_sibling({str(vlap_ablation.DEFAULT_CONFIG)!r}, "
        "'vlap_scenes').get_config(arg)\n    c.optim.weight_decay = 0.01\n    return c\n")
    workdir = tmp_path / "study"
    assert vlap_ablation.main([f"--workdir={workdir}", f"--config={config}"]) == 2
    err = capsys.readouterr().err
    assert "needs optim.weight_decay=0" in err and len(err.strip().splitlines()) == 1
    assert not workdir.exists()


def test_pick_lr_takes_the_lowest_finite_validation_loss():
    assert vlap_ablation.pick_lr({3e-3: 2.5, 1e-2: 2.1, 3e-2: 2.3}) == 1e-2
    assert vlap_ablation.pick_lr({3e-3: 2.5, 1e-2: None, 3e-2: math.nan}) == 3e-3
    assert vlap_ablation.pick_lr({3e-3: 2.0, 1e-2: 2.0}) == 3e-3  # a tie: the smaller rate
    assert vlap_ablation.pick_lr({1e-2: None, 3e-2: None}) == 1e-2  # all diverged (reported)


def test_learning_rate_zero_leaves_the_initialisation():
    """The untrained-map control trains at lr 0: the trainer's AdamW (warm-up, cosine, no decay
    as in configs/vlap_scenes.py) must then leave every parameter exactly where it started."""
    optim = ml_collections.ConfigDict(dict(lr=0.0, lr_scale_batch=0, b1=0.9, b2=0.999, eps=1e-8,
                                           weight_decay=0.0, warmup_steps=0,
                                           weight_decay_mask="all"))
    tx, _ = trainer.make_optimizer(optim, 1, 16)
    params = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (4, 3)), "bias": jnp.ones(3)}
    grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
