"""Plan mode against hand counts on the tiny LQAE config."""

import os

import jax
import ml_collections
import pytest

from lqae_vlap.core import sharding
from lqae_vlap.methods import lqae
from lqae_vlap.train import plan
from tests.helpers import run_cli, tiny_config


def vit_params(width, mlp, heads, depth, tokens, patch_dim, io_dim, encoder):
    """Hand count of one ViT of models/vit.py (no key bias)."""
    block = (2 * 2 * width  # two LayerNorms
             + 3 * width * width + 2 * width  # q, k, v kernels; q and v biases
             + width * width + width  # attention out
             + width * mlp + mlp + mlp * width + width)  # MLP
    common = tokens * width + depth * block + 2 * width  # positions, blocks, final LayerNorm
    if encoder:  # patch embedding in, projection to the LM width out
        return common + patch_dim * width + width + width * io_dim + io_dim
    return common + io_dim * width + width + width * patch_dim + patch_dim


def bert_params(vocab, width, layers, inter, positions, types):
    """Hand count of BertForMaskedLM (tied decoder: only its bias is extra)."""
    layer = 4 * (width * width + width) + 2 * 2 * width + width * inter + inter + inter * width + width
    head = width * width + width + 2 * width + vocab
    return vocab * width + positions * width + types * width + 2 * width + layers * layer + head


@pytest.fixture(scope="module")
def tiny(tiny_mlm_dir):
    config = tiny_config(tiny_mlm_dir)
    config.loss.mlm = 0.1
    return config


def test_counts_and_bytes_match_hand_count(tiny):
    m = tiny.model
    tokens, patch_dim = (m.image_size // m.patch_size) ** 2, m.patch_size ** 2 * m.channels
    e, d = m.encoder, m.decoder
    trainable = (vit_params(e.width, e.mlp_dim, e.num_heads, e.depth, tokens, patch_dim, 32, True)
                 + vit_params(d.width, d.mlp_dim, d.num_heads, d.depth, tokens, patch_dim, 32,
                              False))
    frozen = bert_params(30522, 32, 2, 64, 64, 2) + 1  # + the <mask> token id
    one = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    r = plan.plan(tiny, lqae.build, mesh=one)
    assert r["trainable_params"] == trainable
    assert r["frozen_params"] == frozen
    assert r["params_bytes_per_device"] == 4 * trainable  # float32, one device
    # AdamW: two float32 moments per weight + two int32 step counters
    assert r["opt_state_bytes_per_device"] == 2 * 4 * trainable + 2 * 4
    assert r["frozen_bytes_per_device"] == 4 * frozen
    assert r["batch_bytes_per_device"] == tiny.data.batch_size * m.image_size ** 2 * m.channels
    assert r["temp_bytes_per_device"] > 0
    assert r["total_bytes_per_device"] == sum(
        r[k] for k in ("params_bytes_per_device", "opt_state_bytes_per_device",
                       "frozen_bytes_per_device", "batch_bytes_per_device",
                       "temp_bytes_per_device"))
    # The nearest-word search alone is 2 * tokens * vocab * width FLOPs per image.
    search = 2 * tiny.data.batch_size * tokens * 30522 * 32
    assert r["flops_per_step"] >= search
    assert tiny.plan.peak_tflops == 0 and r["peak_tflops"] == 989.0  # 0: the target's (an H100)
    assert r["step_seconds_at_peak"] == pytest.approx(
        r["flops_per_device_per_step"] / (989.0 * 1e12))


def test_peak_tflops_is_the_given_one_or_the_target_chips():
    def peak(**kw):
        return plan.peak_tflops(ml_collections.ConfigDict({"peak_tflops": 0.0, "target": "cpu",
                                                           **kw}))
    assert peak() == 989.0  # fake CPU devices stand in for H100s
    assert peak(target="tpu:v5e:2x4") == 197.0 and peak(target="tpu:v4:2x2x1") == 275.0
    assert peak(target="tpu:v5e:2x4", peak_tflops=150.0) == 150.0  # a given peak wins
    with pytest.raises(ValueError, match="peak_tflops=-1 must be >= 0"):
        peak(peak_tflops=-1.0)
    with pytest.raises(ValueError, match="is not a plan target"):
        peak(target="gpu:h100")


def test_fsdp_divides_bytes_and_batch_scales_flops(tiny):
    base = plan.plan(tiny.copy_and_resolve_references(), lqae.build)  # config.mesh: data=-1
    tiny.mesh = dict(data=2, fsdp=4, tensor=1)
    fsdp = plan.plan(tiny, lqae.build)
    assert fsdp["trainable_params"] == base["trainable_params"]
    # fsdp=4 splits the frozen word embeddings 4 ways; data parallelism replicates them.
    assert fsdp["frozen_bytes_per_device"] < base["frozen_bytes_per_device"] / 3
    assert fsdp["params_bytes_per_device"] < base["params_bytes_per_device"] / 2
    double = tiny.copy_and_resolve_references()
    double.data.batch_size *= 2
    doubled = plan.plan(double, lqae.build)
    assert 1.8 < doubled["flops_per_step"] / fsdp["flops_per_step"] < 2.2


def test_plan_cli(tmp_path, tiny_mlm_dir):
    proc = run_cli("--config=configs/lqae_tiny.py", f"--workdir={tmp_path}",
                   "--config.mode=plan", f"--config.model.lm_path={tiny_mlm_dir}",
                   "--config.mesh.fsdp=4", "--config.plan.device_memory_gib=0.001")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "(8 cpu devices)" in out and "optimizer state" in out and "XLA temporaries" in out
    assert "DOES NOT FIT" in out  # 1 MiB devices cannot hold the 30,522-word table
    assert not os.listdir(tmp_path)  # planning writes nothing


def test_flops_override_that_changes_nothing_builds_once(tiny):
    """A second (counting) compile only when plan.flops_overrides changes the config."""
    one = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    builds = []

    def build(config, mesh, abstract=False):
        builds.append(config.quantizer.chunk_size)
        return lqae.build(config, mesh, abstract=abstract)

    same = tiny.copy_and_resolve_references()
    same.plan.flops_overrides = {"quantizer": {"chunk_size": same.quantizer.chunk_size}}
    plan.plan(same, build, mesh=one)
    assert builds == [same.quantizer.chunk_size]
    builds.clear()
    other = tiny.copy_and_resolve_references()
    other.plan.flops_overrides = {"quantizer": {"chunk_size": 1 << 20}}
    plan.plan(other, build, mesh=one)
    assert builds == [other.quantizer.chunk_size, 1 << 20]
