"""Checkpoint reading (every format), name-map checks, dtype casting and mesh placement."""

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import serialization, traverse_util
from jax.sharding import NamedSharding
from safetensors.torch import load_file, save_file
from transformers import GPT2Config

from lqae_vlap.models import roberta
from lqae_vlap.models.hf_weights import WEIGHT_FILES, read_state_dict, resolve_checkpoint
from lqae_vlap.core.sharding import make_mesh
from tests.helpers import (assert_real_close as assert_real_tokens_close,
                           masked_lm_batch as padded_batch, masked_lm_torch_run as torch_run,
                           tiny_masked_lm as tiny_torch_model)

FORMATS = ["safetensors", "sharded_safetensors", "bin", "sharded_bin", "flax_msgpack",
           "sharded_flax_msgpack"]


def hf_flax_tree(state: dict[str, torch.Tensor]) -> dict:
    """What transformers' Flax models saved: nested dict, kernels [in, out], 'embedding'/'scale'."""
    tree: dict = {}
    for key, tensor in state.items():
        *parents, leaf = key.split(".")
        if "decoder" in parents:  # Flax heads reuse the embedding table and keep one bias
            continue
        value = tensor.float().numpy()
        if leaf == "weight":
            if parents[-1] in ("LayerNorm", "layer_norm"):
                leaf = "scale"
            elif parents[-1].endswith("embeddings"):
                leaf = "embedding"
            else:
                leaf, value = "kernel", value.T
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def hf_flax_msgpack(state: dict[str, torch.Tensor]) -> bytes:
    return serialization.msgpack_serialize(hf_flax_tree(state))


def write_sharded_flax(state: dict[str, torch.Tensor], folder: Path, chunk_bytes: int = 256) -> None:
    """transformers 4's Flax save_pretrained(max_shard_size=...): '/'-joined flax paths in the
    index's weight_map, each shard the msgpack of its nested sub-dict. Arrays over ``chunk_bytes``
    are split the way flax splits arrays over 1 GiB, so the chunked layout is read here too."""
    flat_tree = traverse_util.flatten_dict(hf_flax_tree(state), sep="/")
    keys = sorted(flat_tree)
    shards = {"flax_model-00001-of-00002.msgpack": keys[::2],
              "flax_model-00002-of-00002.msgpack": keys[1::2]}
    limit = serialization.MAX_CHUNK_SIZE
    serialization.MAX_CHUNK_SIZE = chunk_bytes
    try:
        for name, names in shards.items():
            sub = traverse_util.unflatten_dict({k: flat_tree[k] for k in names}, sep="/")
            (folder / name).write_bytes(serialization.msgpack_serialize(sub))
    finally:
        serialization.MAX_CHUNK_SIZE = limit
    weight_map = {k: name for name, names in shards.items() for k in names}
    total = sum(v.nbytes for v in flat_tree.values())
    (folder / "flax_model.msgpack.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def write_checkpoint(model: torch.nn.Module, folder: Path, fmt: str) -> Path:
    """The model in one of the formats Hugging Face has used over the years."""
    folder.mkdir(parents=True)
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "sharded_safetensors":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    else:
        model.config.save_pretrained(folder)
        state = model.state_dict()  # legacy .bin files also hold the tied decoder weight
        if fmt == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        elif fmt == "sharded_bin":
            keys = sorted(state)
            shards = {"pytorch_model-00001-of-00002.bin": keys[::2],
                      "pytorch_model-00002-of-00002.bin": keys[1::2]}
            for name, names in shards.items():
                torch.save({k: state[k] for k in names}, folder / name)
            weight_map = {k: name for name, names in shards.items() for k in names}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        elif fmt == "flax_msgpack":
            (folder / "flax_model.msgpack").write_bytes(hf_flax_msgpack(state))
        elif fmt == "sharded_flax_msgpack":
            write_sharded_flax(state, folder)
    return folder


def flat(variables) -> dict:
    return traverse_util.flatten_dict(variables["params"])


@pytest.fixture(scope="module", params=["bert", "roberta"])
def reference(request, tmp_path_factory):
    """(kind, torch model, safetensors folder, its params) shared by the format tests."""
    model = tiny_torch_model(request.param)
    folder = write_checkpoint(model, tmp_path_factory.mktemp(request.param) / "st", "safetensors")
    return request.param, model, folder, flat(roberta.load(folder)[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_identical_params(reference, tmp_path, fmt):
    kind, model, _, expected = reference
    folder = write_checkpoint(model, tmp_path / fmt, fmt)
    state = read_state_dict(folder)
    torch_state = model.state_dict()
    for key, value in state.items():
        np.testing.assert_array_equal(value, torch_state[key].numpy(), err_msg=key)
    module, variables, _ = roberta.load(folder)
    assert module.config.has_lm_head and module.config.model_type == kind
    got = flat(variables)
    assert set(got) == set(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=str(path))


def test_sharded_flax_msgpack_is_lazy_and_checked(tmp_path, monkeypatch):
    from lqae_vlap.models import flax_msgpack, hf_weights  # noqa: PLC0415

    model = tiny_torch_model("roberta")
    folder = write_checkpoint(model, tmp_path / "flax", "sharded_flax_msgpack")
    raw = (folder / "flax_model-00001-of-00002.msgpack").read_bytes()
    assert b"__msgpack_chunked_array__" in raw  # the chunked layout really is exercised
    reads = []
    read = flax_msgpack._read_flax_array
    monkeypatch.setattr(flax_msgpack, "_read_flax_array", lambda *a: reads.append(a) or read(*a))
    state = hf_weights.open_state_dict(folder)
    key = "roberta.encoder.layer.1.intermediate.dense.weight"
    assert state.shape(key) == (64, 32) and reads == []  # shapes without reading any tensor
    np.testing.assert_array_equal(state[key], model.state_dict()[key].numpy())
    assert len(reads) == 1
    # An index naming a tensor its shard lacks, or a shard that is not there: named errors.
    original = (folder / "flax_model.msgpack.index.json").read_text()
    index = json.loads(original)
    index["weight_map"]["roberta/pooler/dense/kernel"] = "flax_model-00001-of-00002.msgpack"
    (folder / "flax_model.msgpack.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="tensors \\(1\\): roberta/pooler/dense/kernel.*re-download"):
        hf_weights.open_state_dict(folder)
    index["weight_map"]["roberta/pooler/dense/kernel"] = "flax_model-00003-of-00003.msgpack"
    (folder / "flax_model.msgpack.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="flax_model-00003-of-00003.msgpack"):
        hf_weights.open_state_dict(folder)
    (folder / "flax_model.msgpack.index.json").write_text(original)
    for cut in (len(raw) // 2, len(raw) - 10):  # mid-structure, and inside the last tensor
        (folder / "flax_model-00001-of-00002.msgpack").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="truncated msgpack"):
            hf_weights.open_state_dict(folder)


def test_bfloat16_checkpoints_read(tmp_path):
    model = tiny_torch_model("roberta").to(torch.bfloat16)
    for fmt in ("safetensors", "bin"):
        folder = write_checkpoint(model, tmp_path / fmt, fmt)
        state = read_state_dict(folder)
        key = "roberta.encoder.layer.0.attention.self.query.weight"
        assert state[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(state[key].astype(np.float32),
                                      model.state_dict()[key].float().numpy())
        _, variables, _ = roberta.load(folder, dtype=jnp.bfloat16)
        kernel = variables["params"]["layer_0"]["attention"]["query"]["kernel"]
        assert kernel.dtype == jnp.bfloat16 and kernel.shape == (32, 4, 8)
        np.testing.assert_array_equal(np.asarray(kernel, np.float32),
                                      state[key].astype(np.float32).T.reshape(32, 4, 8))


def test_bfloat16_load_equals_float32_cast(reference):
    _, _, folder, expected = reference
    _, variables, _ = roberta.load(folder, dtype=jnp.bfloat16)
    got = flat(variables)
    for path, value in expected.items():
        assert got[path].dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value.astype(jnp.bfloat16)))


def _edited_checkpoint(tmp_path: Path, edit) -> Path:
    """The tiny RoBERTa checkpoint with its state dict changed by ``edit``."""
    source = write_checkpoint(tiny_torch_model("roberta"), tmp_path / "source", "safetensors")
    folder = tmp_path / "edited"
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    state = load_file(source / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_missing_key_is_named(tmp_path):
    key = "roberta.encoder.layer.1.output.dense.bias"
    folder = _edited_checkpoint(tmp_path, lambda s: s.pop(key))
    with pytest.raises(ValueError, match=r"missing keys \(1\): " + re.escape(key)):
        roberta.load(folder)


def test_unexpected_key_is_named(tmp_path):
    key = "roberta.encoder.layer.1.surprise.weight"
    folder = _edited_checkpoint(tmp_path, lambda s: s.update({key: torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): " + re.escape(key)):
        roberta.load(folder)


def test_shape_mismatch_is_named(tmp_path):
    key = "roberta.encoder.layer.0.intermediate.dense.weight"
    folder = _edited_checkpoint(tmp_path, lambda s: s.update({key: torch.zeros(48, 32)}))
    with pytest.raises(ValueError, match=re.escape(f"{key} has shape (48, 32), expected (64, 32)")):
        roberta.load(folder)


def test_config_that_does_not_fit_the_weights(tmp_path):
    folder = write_checkpoint(tiny_torch_model("bert"), tmp_path / "bert", "safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape("bert.encoder.layer.2.")):
        roberta.load(folder)


def test_bad_locations_raise_clear_errors(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        roberta.load(missing)
    # A hub-style name where the hub is unreachable (tests run with HF_HUB_OFFLINE=1).
    with pytest.raises(FileNotFoundError, match="'nobody-owns-this/tiny-model-xyz'.*local folder"):
        resolve_checkpoint("nobody-owns-this/tiny-model-xyz")
    empty = tmp_path / "empty"
    empty.mkdir()
    GPT2Config().save_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="looked for " + re.escape(", ".join(WEIGHT_FILES))):
        read_state_dict(empty)
    with pytest.raises(ValueError, match="is a file"):
        resolve_checkpoint(empty / "config.json")
    torch.save({}, empty / "pytorch_model.bin")
    with pytest.raises(ValueError, match="model_type 'gpt2'.*supported"):
        roberta.load(empty)


def _spec(sharding: NamedSharding) -> tuple:
    spec = tuple(sharding.spec)
    while spec and spec[-1] is None:  # P('a', None) and P('a') are the same layout
        spec = spec[:-1]
    return spec


def test_mesh_placement(tmp_path):
    model = tiny_torch_model("roberta")
    folder = write_checkpoint(model, tmp_path / "rb", "safetensors")
    module, host_vars, config = roberta.load(folder)
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    _, variables, _ = roberta.load(folder, mesh=mesh)
    got = flat(variables)
    for path, value in flat(host_vars).items():
        assert isinstance(got[path].sharding, NamedSharding) and got[path].sharding.mesh == mesh
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=str(path))
    # Expected layouts written out from the rules embed->fsdp, mlp/heads/vocab->tensor.
    expected = {
        ("embeddings", "word_embeddings", "embedding"): ("tensor", "fsdp"),  # [100, 32]
        ("embeddings", "position_embeddings", "embedding"): (None, "fsdp"),  # [40, 32]
        ("embeddings", "token_type_embeddings", "embedding"): (None, "fsdp"),  # [1, 32]: 1 % 2 != 0
        ("embeddings", "layer_norm", "scale"): (),
        ("layer_0", "attention", "query", "kernel"): ("fsdp", "tensor"),  # [32, 4, 8]
        ("layer_0", "attention", "query", "bias"): ("tensor",),  # [4, 8]
        ("layer_1", "attention", "out", "kernel"): ("tensor", None, "fsdp"),  # [4, 8, 32]
        ("layer_1", "mlp", "wi", "kernel"): ("fsdp", "tensor"),  # [32, 64]
        ("layer_1", "mlp", "wo", "kernel"): ("tensor", "fsdp"),  # [64, 32]
        ("lm_head", "dense", "kernel"): ("fsdp", "tensor"),
        ("lm_head", "bias"): ("tensor",),  # [100]
    }
    for path, spec in expected.items():
        assert _spec(got[path].sharding) == spec, path
    word = got[("embeddings", "word_embeddings", "embedding")]
    assert {s.data.shape for s in word.addressable_shards} == {(50, 8)}
    # The placed tree runs as is under jit and still matches PyTorch.
    ids, mask, _ = padded_batch(config.pad_token_id)
    out = jax.jit(module.apply)(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    _, logits = torch_run(model, input_ids=ids, attention_mask=mask)
    assert_real_tokens_close(out["logits"], logits, mask)
