"""Damaged checkpoint folders: every reader names the file and what is wrong in one ValueError
(main prints it as one `error:` line), before any tensor is read and before a workdir exists."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from lqae_vlap.models import hf_weights, roberta
from tests.helpers import run_cli


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _damage(folder: Path, name: str, how: str) -> Path:
    path = folder / name
    data = path.read_bytes()
    if how == "truncated":
        data = data[:len(data) // 2]
    elif how == "garbage":  # the same size, random bytes
        data = np.random.default_rng(0).integers(0, 256, len(data), np.uint8).tobytes()
    elif how == "four_bytes":
        data = data[:4]
    elif how == "empty":
        data = b""
    path.write_bytes(data)
    return path


SAFETENSORS_DAMAGE = {
    "truncated": r"is truncated: its header says [\d,]+ bytes of tensors, the file holds [\d,]+; "
                 r"re-download it",
    "garbage": r"is truncated or not a safetensors file: its first 8 bytes say a [\d,]+-byte "
               r"header, the file holds [\d,]+ bytes",
    "four_bytes": r"is 4 bytes, too short for a safetensors file",
    "empty": r"is 0 bytes, too short for a safetensors file",
}


@pytest.mark.parametrize("how", sorted(SAFETENSORS_DAMAGE))
def test_damaged_safetensors_is_named(tiny_mlm_dir, tmp_path, how):
    path = _damage(_copy(tiny_mlm_dir, tmp_path / "m"), "model.safetensors", how)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " " + SAFETENSORS_DAMAGE[how]):
        roberta.load(path.parent)


def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n, header = _header(path)
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


def test_safetensors_header_checks_each_tensor(tiny_mlm_dir, tmp_path):
    folder = _copy(tiny_mlm_dir, tmp_path / "m")
    path = folder / "model.safetensors"
    key = sorted(k for k in _header(path)[1] if k != "__metadata__")[0]

    def wrong_shape(h):
        h[key]["shape"] = [d + 1 for d in h[key]["shape"]]

    _rewrite_header(path, wrong_shape)
    with pytest.raises(ValueError, match=re.escape(f"{path}: tensor {key!r}") + r".* needs [\d,]+ "
                       r"bytes but its header gives it [\d,]+; the file is damaged"):
        hf_weights.open_state_dict(folder)

    def no_offsets(h):
        del h[key]["data_offsets"]

    shutil.copy(Path(tiny_mlm_dir) / "model.safetensors", path)
    _rewrite_header(path, no_offsets)
    with pytest.raises(ValueError, match=re.escape(f"{path}: the header entry of tensor {key!r} "
                                                   "is malformed")):
        hf_weights.open_state_dict(folder)


def test_header_that_is_not_json_is_named(tiny_mlm_dir, tmp_path):
    folder = _copy(tiny_mlm_dir, tmp_path / "m")
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # the header's first bytes: neither UTF-8 nor JSON
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not a safetensors file: its "
                       "header is not JSON"):
        roberta.load(folder)


def test_shape_mismatch_names_file_tensor_and_both_shapes(tiny_mlm_dir, tmp_path):
    folder = _copy(tiny_mlm_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48  # the architecture no longer fits the stored weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        roberta.load(folder)
    message = str(e.value)
    assert str(folder / "model.safetensors") in message
    assert "bert.encoder.layer.0.intermediate.dense.weight has shape (64, 32), expected (48, 32)" \
        in message


@pytest.mark.parametrize("text,where", [
    ('{"model_type": "bert", "hidden_size": 32,', "line 1 column 42"),
    ('{"model_type": "bert"}\n}', "line 2 column 1"),
])
def test_malformed_config_json_is_named_with_the_position(tiny_mlm_dir, tmp_path, text, where):
    folder = _copy(tiny_mlm_dir, tmp_path / "m")
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'} is not valid JSON: ")
                       + ".*" + where):
        roberta.load(folder)


def test_config_json_that_is_not_an_object(tiny_mlm_dir, tmp_path):
    folder = _copy(tiny_mlm_dir, tmp_path / "m")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'} holds a JSON list")):
        hf_weights.read_hf_config(folder)


def _bin_folder(tiny_mlm_dir: str, folder: Path) -> Path:
    import torch

    folder = _copy(tiny_mlm_dir, folder)
    state = hf_weights.read_state_dict(folder)
    (folder / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
               folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_damaged_pytorch_bin_is_named(tiny_mlm_dir, tmp_path, how):
    folder = _bin_folder(tiny_mlm_dir, tmp_path / "m")
    roberta.load(folder)  # the undamaged copy loads
    path = _damage(folder, "pytorch_model.bin", how)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " cannot be read as a PyTorch "
                       r"checkpoint \(.*\); it is truncated or damaged: re-download it"):
        roberta.load(folder)


def _msgpack_folder(tiny_mlm_dir: str, folder: Path) -> Path:
    from flax import serialization

    folder = _copy(tiny_mlm_dir, folder)
    tree = {"layer": {"kernel": np.arange(24, dtype=np.float32).reshape(4, 6),
                      "bias": np.ones(6, np.float32)}}
    (folder / "model.safetensors").unlink()
    (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    return folder


@pytest.mark.parametrize("how", ["truncated", "garbage", "four_bytes", "empty"])
def test_damaged_flax_msgpack_is_named(tiny_mlm_dir, tmp_path, how):
    folder = _msgpack_folder(tiny_mlm_dir, tmp_path / "m")
    assert hf_weights.read_state_dict(folder)["layer.weight"].shape == (6, 4)
    path = _damage(folder, "flax_model.msgpack", how)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        hf_weights.open_state_dict(folder)


def test_flax_array_whose_bytes_do_not_fit_its_shape(tiny_mlm_dir, tmp_path):
    import msgpack

    folder = _msgpack_folder(tiny_mlm_dir, tmp_path / "m")
    # flax's ndarray leaf is ext 1 = packb((shape, dtype, bytes)): claim 5 x 6 for 4 x 6 bytes.
    leaf = msgpack.ExtType(1, msgpack.packb(((5, 6), "float32", np.zeros((4, 6), np.float32)
                                             .tobytes())))
    (folder / "flax_model.msgpack").write_bytes(msgpack.packb({"layer": {"kernel": leaf}}))
    with pytest.raises(ValueError, match=re.escape(str(folder / "flax_model.msgpack"))
                       + r": the array at offset \d+ is float32 \(5, 6\) but holds 96 bytes"):
        hf_weights.open_state_dict(folder)


def test_sharded_index_problems_are_named(tiny_mlm_dir, tmp_path):
    folder = _copy(tiny_mlm_dir, tmp_path / "m")
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=re.escape(f"{index} is not a shard index")):
        hf_weights.open_state_dict(folder)
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{index} lists shard 'model-00002-of-00002.safetensors', which is not in {folder}")):
        hf_weights.open_state_dict(folder)


@pytest.mark.parametrize("damage", ["truncated_safetensors", "malformed_config"])
def test_cli_gives_one_line_and_creates_no_workdir(tiny_mlm_dir, tmp_path, damage):
    folder = _copy(tiny_mlm_dir, tmp_path / "m")
    if damage == "truncated_safetensors":
        bad = _damage(folder, "model.safetensors", "truncated")
    else:
        bad = folder / "config.json"
        bad.write_text(bad.read_text()[:-20])
    workdir = tmp_path / "w"
    proc = run_cli("--config=configs/lqae_tiny.py", f"--workdir={workdir}",
                   f"--config.model.lm_path={folder}")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(bad) in lines[0] and ("re-download" in lines[0]), lines[0]
    assert not workdir.exists(), "a run that fails to load its model must not create the workdir"
