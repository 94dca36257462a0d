"""bench/vs_authors_lqae.py: our side runs at tiny sizes and reports finite figures, the table's
ratio, its errors; the authors' side only where a checkout is given (LQAE_AUTHORS, and
LQAE_AUTHORS_SITE for transformers 4.x + dill)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

TINY = ["--width=64", "--depth=1", "--vocab=512", "--batch=2", "--image=16", "--patch=8",
        "--rounds=2", "--steps=1"]


def _cpu_env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _run(args, tmp_path, timeout=600):
    return subprocess.run([sys.executable, "bench/vs_authors_lqae.py", *args,
                           f"--results={tmp_path / 'RESULTS.md'}", f"--out={tmp_path / 'o.json'}"],
                          cwd=REPO, env=_cpu_env(), capture_output=True, text=True,
                          timeout=timeout)


def _table_module():
    sys.path.insert(0, REPO)
    from bench import vs_authors_lqae
    return vs_authors_lqae


def test_ours_alone_at_tiny_sizes(tmp_path):
    """Both of our rows: the plain block timed (2 rounds x 1 step, finite loss, compiled
    memory and FLOPs) and the released block, each really the block it names."""
    proc = _run([*TINY, "--ours-block=both"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "o.json").read_text())["rows"]}
    plain = rows["ours-plain"]
    assert plain["steps"] == 2 and plain["median_s"] > 0 and plain["temp_bytes"] > 0
    assert plain["flops"] > 0 and plain["loss"] == plain["loss"]  # not NaN
    released = rows["ours-released"]
    assert released["steps"] == 2 and released["median_s"] > 0, released
    # Two different blocks: the plain row must not run the paper config's released default.
    assert "plain ViT" in plain["label"] and "released ViT" in released["label"]
    assert plain["flops"] != released["flops"] and plain["loss"] != released["loss"]
    md = (tmp_path / "RESULTS.md").read_text()
    assert "### LQAE train step vs the authors' code" in md and "ours (plain ViT block, remat " in md


def test_remat_both_gives_one_row_per_setting(tmp_path):
    """--ours-remat=both: the released block twice, remat on and off, each row saying which;
    remat changes how the backward pass is computed, not the values."""
    proc = _run([*TINY, "--ours-block=released", "--ours-remat=both"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "o.json").read_text())["rows"]}
    assert set(rows) == {"ours-released-remat-on", "ours-released-remat-off"}, set(rows)
    on, off = rows["ours-released-remat-on"], rows["ours-released-remat-off"]
    assert "remat True" in on["label"] and "remat False" in off["label"]
    assert on["steps"] == off["steps"] == 2
    assert abs(on["loss"] - off["loss"]) <= 1e-5 * abs(off["loss"])


def test_table_ratio_is_theirs_over_ours():
    m = _table_module()
    row = dict(temp_bytes=2.45e9, argument_bytes=1e8, flops=3e11, compile_s=40.0, loss=1.0,
               steps=10)
    text = m.table([dict(row, name="ours-plain", label="ours", median_s=3.0),
                    dict(row, name="ours-released", label="ours released", note="unavailable"),
                    dict(row, name="theirs", label="theirs", median_s=10.0)])
    lines = text.splitlines()
    assert lines[2].startswith("| ours | 3.000 | 10 | 3.33x | 2.45 |"), lines[2]
    assert lines[3].startswith("| ours released | unavailable |"), lines[3]
    assert lines[4].startswith("| theirs | 10.000 | 10 | 1.00x |"), lines[4]


def test_a_folder_without_their_code_is_one_error_line(tmp_path):
    proc = _run(["--authors", str(tmp_path)], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --authors={tmp_path} has no lqae/models/lqae.py; pass the root of a checkout "
        "of github.com/forhaoliu/language-quantized-autoencoders"]


@pytest.mark.skipif(not os.environ.get("LQAE_AUTHORS"),
                    reason="set LQAE_AUTHORS (and LQAE_AUTHORS_SITE) to a checkout of their code")
def test_theirs_at_tiny_sizes(tmp_path):
    proc = _run([*TINY, "--ours-block=plain", f"--authors={os.environ['LQAE_AUTHORS']}",
                 f"--authors-site={os.environ.get('LQAE_AUTHORS_SITE', '')}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "o.json").read_text())["rows"]}
    assert rows["theirs"]["median_s"] > 0 and rows["theirs"]["loss"] == rows["theirs"]["loss"]
