"""Plan mode's target knob: 'cpu' (fake CPU devices) or a TPU topology compiled ahead of time by
libtpu on a machine without one (train/plan.py). The TPU compile runs only where libtpu can be
found: ``pip install 'jax[tpu]'``, $TPU_LIBRARY_PATH, or $LQAE_VLAP_TEST_LIBTPU naming libtpu.so
or a ``pip install --no-deps --target DIR libtpu`` folder (so that the main environment need not
have it: installed there, every jax start would probe for a TPU)."""

import importlib.util
import os
import re

import pytest

from lqae_vlap.train import plan
from tests.helpers import TINY_VLAP_PLAN, run_cli

TINY_VLAP = (*TINY_VLAP_PLAN, "--config.model.llm_dtype=bfloat16")


def _libtpu() -> str | None:
    """A libtpu to compile with ('' : the installed package), or None: the TPU tests skip."""
    for var in ("LQAE_VLAP_TEST_LIBTPU", "TPU_LIBRARY_PATH"):
        if os.environ.get(var) and os.path.exists(os.environ[var]):
            return os.environ[var]
    return "" if importlib.util.find_spec("libtpu") is not None else None


@pytest.mark.parametrize("target, parsed", [("", ("cpu", "")), ("cpu", ("cpu", "")),
                                            ("tpu:v5e:2x4", ("tpu", "v5e:2x4")),
                                            ("tpu:v5p:2x2x1", ("tpu", "v5p:2x2x1"))])
def test_targets_parse(target, parsed):
    assert plan.parse_target(target) == parsed


@pytest.mark.parametrize("target", ["gpu", "tpu", "tpu:v5e", "tpu:v9:2x2", "tpu:v5e:8",
                                    "tpu:v5e-8", "v5e:2x4"])
def test_bad_targets_name_the_valid_ones(target):
    with pytest.raises(ValueError) as e:
        plan.parse_target(target)
    message = str(e.value)
    assert "\n" not in message and f"config.plan.target={target!r}" in message
    assert "'cpu'" in message and "tpu:GEN:AxB" in message
    assert all(gen in message for gen in plan.TPU_HBM_GIB)


def test_bad_target_and_libtpu_are_one_line_errors(tmp_path):
    proc = run_cli(*TINY_VLAP, f"--workdir={tmp_path}", "--config.plan.target=tpu:v9:2x2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config.plan.target='tpu:v9:2x2' is not a plan target; use " + plan.TARGET_HELP]
    proc = run_cli(*TINY_VLAP, f"--workdir={tmp_path}", "--config.plan.target=tpu:v5e:2x4",
                   f"--config.plan.libtpu={tmp_path}/none")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: config.plan.libtpu='{tmp_path}/none' is neither libtpu.so nor a folder")
    assert not os.listdir(tmp_path)


def _figures(out: str) -> dict[str, str]:
    """'    frozen weights     0.123 MiB' -> {'frozen weights': '0.123 MiB'} from a plan report."""
    rows = (re.match(r"    (\w[\w ]*?) +([0-9.]+ [MG]iB)", line) for line in out.splitlines())
    return {m.group(1): m.group(2) for m in rows if m}


@pytest.mark.skipif(_libtpu() is None, reason="libtpu not found: pip install 'jax[tpu]' or set "
                    "LQAE_VLAP_TEST_LIBTPU to a pip --target folder holding it")
def test_tpu_target_compiles_for_the_topology(tmp_path):
    """The same step compiled for 8 v5e chips: the state's bytes are the CPU plan's (they follow
    from the shardings alone), the memory analysis and FLOPs are the TPU compiler's."""
    libtpu = [f"--config.plan.libtpu={_libtpu()}"] if _libtpu() else []
    cpu = run_cli(*TINY_VLAP, f"--workdir={tmp_path}", "--config.mesh.data=8")
    tpu = run_cli(*TINY_VLAP, f"--workdir={tmp_path}", "--config.mesh.data=8",
                  "--config.plan.target=tpu:v5e:2x4", *libtpu)
    assert cpu.returncode == 0 and tpu.returncode == 0, cpu.stderr + tpu.stderr
    assert "(8 cpu devices)" in cpu.stdout
    assert "(8 tpu devices: TPU v5 lite, compiled ahead of time)" in tpu.stdout
    assert "2,080 trainable" in tpu.stdout  # Dense 64 -> 32 with bias, as on CPU
    c, t = _figures(cpu.stdout), _figures(tpu.stdout)
    for row in ("trainable params", "optimizer state", "frozen weights", "batch"):
        assert c[row] == t[row], row
    assert float(t["XLA temporaries"].split()[0]) > 0
    # An 8-device topology was compiled: a 4-device one is not divisible into data=8.
    small = run_cli(*TINY_VLAP, f"--workdir={tmp_path}", "--config.mesh.data=8",
                    "--config.plan.target=tpu:v5e:2x2", *libtpu)
    assert small.returncode != 0
    assert not os.listdir(tmp_path)
