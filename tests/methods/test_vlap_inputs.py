"""Bad VLAP inputs end in one line that names the key or file and the fix, before a workdir
exists: an evaluation batch larger than the held-out set, a damaged feature cache."""

from pathlib import Path

import jax
import numpy as np
import pytest

from lqae_vlap.core import sharding
from lqae_vlap.methods import vlap
from tests.helpers import load_config, run_cli

# vlap_demo on the tiny Llama, 1 step, the held-out loss only: as small as the demo gets.
SMALL = {"data.batch_size": 8, "model.vision.width": 24, "eval.evals": ("loss",),
         "eval.batch_size": 8, "eval.num_batches": 1}


def flags(overrides):
    return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
            for k, v in overrides.items()]


def one_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_eval_batch_larger_than_the_held_out_set_names_its_key(tiny_llama_dir, tmp_path):
    overrides = {"model.llm_path": tiny_llama_dir, **SMALL, "eval.batch_size": 1000}
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    with pytest.raises(ValueError, match=r"^config.eval.batch_size=1000 is larger than the source "
                       r"\(297 examples\).* Set config.eval.batch_size to at most 297"):
        vlap.build(load_config("vlap_demo:1", **overrides), mesh)
    workdir = tmp_path / "w"
    line = one_error_line(run_cli("--config=configs/vlap_demo.py:1", f"--workdir={workdir}",
                                  *flags(overrides)))
    assert "config.eval.batch_size=1000" in line and "global_batch_size" not in line, line
    assert not workdir.exists()


def test_damaged_feature_cache_is_one_line_with_the_rebuild_command(tiny_llama_dir, tmp_path):
    overrides = {"model.llm_path": tiny_llama_dir, **SMALL, "data.feature_cache.enabled": True,
                 "data.feature_cache.dir": str(tmp_path / "fc"),
                 "data.feature_cache.batch_size": 300}
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    vlap.build(load_config("vlap_demo:1", **overrides), mesh)  # computes and stores the cache
    caches = sorted(Path(tmp_path / "fc").glob("*.npy"), key=lambda p: p.stat().st_size)
    train = caches[-1]  # 1500 training digits; the other file holds the 297 held-out ones
    data = bytearray(train.read_bytes())
    data[-4096:] = np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes()
    train.write_bytes(bytes(data))  # same size, the .npy header intact
    workdir = tmp_path / "w"
    line = one_error_line(run_cli("--config=configs/vlap_demo.py:1", f"--workdir={workdir}",
                                  *flags(overrides)))
    assert f"corrupt feature cache: {train} does not match the checksum" in line, line
    assert f"Rebuild it: rm -f {train} {train.with_suffix('.json')}" in line, line
    assert "&& python -m lqae_vlap.main --config=configs/vlap_demo.py:1" in line, line
    assert not workdir.exists()
