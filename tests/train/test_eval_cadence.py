"""The trainer runs each evaluation on its own cadence (``config.eval.<name>.every``)."""

import os

from lqae_vlap.methods import lqae
from lqae_vlap.train import metrics as metrics_lib
from lqae_vlap.train import trainer
from tests.helpers import tiny_config


def test_each_evaluation_runs_on_its_own_cadence(tmp_path, tiny_mlm_dir):
    # reconstruction every 2 steps, fewshot on train.eval_every (-1) = 3; both at the end (4).
    config = tiny_config(tiny_mlm_dir, **{
        "train.steps": 4, "train.eval_every": 3, "train.checkpoint_every": 100,
        "eval.evals": ("reconstruction", "fewshot"), "eval.reconstruction.every": 2,
        "eval.fewshot.every": -1})
    trainer.train_and_evaluate(config, str(tmp_path), lqae.build)
    written = sorted(f for f in os.listdir(tmp_path) if f.startswith("eval_"))
    assert written == ["eval_fewshot_000003.json", "eval_fewshot_000004.json",
                       "eval_reconstruction_000002.json", "eval_reconstruction_000004.json"]
    records = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    for name, steps in (("reconstruction", [2, 4]), ("fewshot", [3, 4])):
        logged = [r["step"] for r in records if any(k.startswith(f"eval/{name}/") for k in r)]
        assert logged == steps, (name, logged)
