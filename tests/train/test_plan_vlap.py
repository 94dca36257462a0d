"""Plan mode for VLAP, offline from architecture presets, against hand counts.

The tiny OPT and tiny CLIP are described only by HF config fields (config.model.llm_arch,
config.model.vision.arch) under hub names that do not exist: nothing is read or downloaded.
"""

import os

import jax
import pytest

from lqae_vlap.core import sharding
from lqae_vlap.methods import vlap
from lqae_vlap.train import plan
from tests.helpers import TINY_VLAP_PLAN, load_config, run_cli

# Tiny OPT (pre-LN, word embeddings as wide as the model) and tiny CLIP vision tower.
V, D, F, LAYERS, HEADS, POS = 96, 16, 32, 2, 2, 64
VD, VF, VLAYERS, VHEADS, IMAGE, PATCH = 8, 24, 1, 2, 32, 16
TINY_OPT = dict(model_type="opt", vocab_size=V, hidden_size=D, ffn_dim=F, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=POS, word_embed_proj_dim=D,
                do_layer_norm_before=True)
TINY_CLIP = dict(model_type="clip_vision_model", hidden_size=VD, intermediate_size=VF,
                 num_hidden_layers=VLAYERS, num_attention_heads=VHEADS, image_size=IMAGE,
                 patch_size=PATCH, num_channels=3, projection_dim=4)


def opt_params():
    """Hand count of OPTForCausalLM (tied head; HF's learned positions carry 2 offset rows)."""
    layer = (4 * (D * D + D)  # q, k, v, out projections with biases
             + 2 * D  # self_attn_layer_norm
             + D * F + F + F * D + D  # fc1, fc2
             + 2 * D)  # final_layer_norm of the layer
    return V * D + (POS + 2) * D + LAYERS * layer + 2 * D  # + the decoder's final LayerNorm


def clip_vision_params():
    """Hand count of CLIPVisionModel (no projection: VLAP feeds its last hidden states)."""
    tokens = (IMAGE // PATCH) ** 2 + 1  # patches + CLS
    layer = 2 * 2 * VD + 4 * (VD * VD + VD) + VD * VF + VF + VF * VD + VD
    return (VD  # class embedding
            + PATCH * PATCH * 3 * VD  # patch embedding (bias-free conv)
            + tokens * VD  # positions
            + 2 * VD + VLAYERS * layer + 2 * VD)  # pre- and post-LayerNorm


def tiny_config():
    c = load_config("vlap_opt:opt-125m")
    c.mode = "plan"
    c.model.llm_path = "nonexistent-org/tiny-opt-for-planning"  # not a folder: the arch is used
    c.model.llm_arch = TINY_OPT
    c.model.vision.path = "nonexistent-org/tiny-clip-for-planning"
    c.model.vision.arch = TINY_CLIP
    c.model.max_caption_len = 6
    c.data.batch_size = 8
    c.train.steps = 10
    c.optim.warmup_steps = 2
    return c


def test_hand_counts_match_the_reference_torch_models():
    """The hand counts above are the real architectures' (transformers' own parameter counts)."""
    import transformers

    torch_opt = transformers.OPTForCausalLM(transformers.OPTConfig(**TINY_OPT))
    assert sum(p.numel() for p in torch_opt.parameters()) == opt_params()  # tied head once
    arch = {k: v for k, v in TINY_CLIP.items() if k != "model_type"}
    torch_clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**arch))
    assert sum(p.numel() for p in torch_clip.parameters()) == clip_vision_params()


def test_counts_and_bytes_match_hand_count():
    config = tiny_config()
    one = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    r = plan.plan(config, vlap.build, mesh=one)
    trainable = VD * D + D  # the one Dense: vision width -> LLM word-embedding width, with bias
    prompt = int(config.model.prompt_len)
    frozen = opt_params() + clip_vision_params() + prompt + V  # + prompt ids + word marginal
    assert r["trainable_params"] == trainable
    assert r["frozen_params"] == frozen
    assert r["params_bytes_per_device"] == 4 * trainable  # float32, one device
    # AdamW: two float32 moments per weight + two int32 step counters
    assert r["opt_state_bytes_per_device"] == 2 * 4 * trainable + 2 * 4
    assert r["frozen_bytes_per_device"] == 4 * frozen  # float32 weights, int32 ids
    b, cap = config.data.batch_size, config.model.max_caption_len
    assert r["batch_bytes_per_device"] == b * IMAGE * IMAGE * 3 + 2 * 4 * b * cap
    assert r["temp_bytes_per_device"] > 0
    # The frozen LLM's forward on [prefix; prompt; caption] alone: 2 FLOPs per weight per token
    # in its layers' matmuls and the tied head.
    tokens = (IMAGE // PATCH) ** 2 + 1 + prompt + cap
    matmuls = LAYERS * (4 * D * D + 2 * D * F) + V * D
    assert r["flops_per_step"] >= 2 * b * tokens * matmuls


def test_fsdp_splits_the_frozen_llm():
    config = tiny_config()
    config.mesh = dict(data=1, fsdp=8, tensor=1)
    r = plan.plan(config, vlap.build)
    assert r["devices"] == 8
    full = 4 * (opt_params() + clip_vision_params() + int(config.model.prompt_len) + V)
    # Every OPT matrix has an 'embed' axis (16 = 8 x 2), so fsdp=8 holds an eighth of each.
    assert r["frozen_bytes_per_device"] < full / 3
    assert r["params_bytes_per_device"] < 4 * (VD * D + D) / 4


def test_abstract_build_reads_nothing_without_an_arch():
    config = tiny_config()
    config.model.llm_arch = {}
    with pytest.raises(ValueError, match="config.model.llm_arch"):
        vlap.build(config, sharding.make_mesh({"data": -1}), abstract=True)


def test_plan_cli_offline(tmp_path):
    """The real preset (opt-125m + CLIP ViT-B/32) shrunk by flags, end to end through main.py."""
    proc = run_cli(*TINY_VLAP_PLAN, f"--workdir={tmp_path}", "--config.mesh.fsdp=8",
                   "--config.mesh.data=1", "--config.plan.device_memory_gib=0.001")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "(8 cpu devices)" in out and "frozen weights" in out and "XLA temporaries" in out
    # Dense 64 -> 32 with bias; the 50,272-word table alone is 1.6M frozen parameters.
    assert "2,080 trainable" in out
    assert "DOES NOT FIT" in out
    assert not os.listdir(tmp_path)  # planning writes nothing


@pytest.mark.parametrize("family", ["opt", "llama", "clip"])
def test_abstract_loaders_match_the_real_load(family, tmp_path):
    """abstract=True (weights present, config.json only, or a config object) gives the real
    load's shapes and dtypes, with the mesh's shardings, without reading a tensor."""
    import importlib

    import transformers

    cls, cfg = {
        "opt": (transformers.OPTForCausalLM, transformers.OPTConfig(
            vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
            word_embed_proj_dim=8, do_layer_norm_before=False, max_position_embeddings=32)),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1)),
        "clip": (transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=16, projection_dim=4)),
    }[family]
    load = importlib.import_module(f"lqae_vlap.models.{family}").load
    cls(cfg).save_pretrained(tmp_path)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
    _, real, _ = load(str(tmp_path), mesh=mesh)
    spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)  # noqa: E731
    assert spec(load(str(tmp_path), mesh=mesh, abstract=True)[1]) == spec(real)
    os.remove(tmp_path / "model.safetensors")  # config.json alone
    assert spec(load(str(tmp_path), mesh=mesh, abstract=True)[1]) == spec(real)
    assert spec(load(None, mesh=mesh, abstract=True, hf_config=cfg)[1]) == spec(real)
    with pytest.raises(ValueError, match="abstract=True"):
        load(None, hf_config=cfg)


def test_auto_remat_tries_policies_in_flops_order_until_one_fits(capsys):
    config = tiny_config()
    config.model.llm_remat = "auto"
    assert plan.auto_remat_keys(config) == [("model", "llm_remat")]
    one = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    roomy = plan.plan(config, vlap.build, mesh=one)
    assert roomy["fits"] and roomy["remat"] == 0 and roomy["remat_tried"] == 1  # 'none' fits
    config.plan.device_memory_gib = 1e-9  # nothing fits: every policy is tried, the last kept
    tight = plan.plan(config, vlap.build, mesh=one)
    assert not tight["fits"] and tight["remat_tried"] == len(plan.REMAT_ORDER)
    assert tight["flops_per_step"] > roomy["flops_per_step"]  # 'full' recomputes the layers
    out = capsys.readouterr().out
    assert "model.llm_remat = 'dots'" in out and "none fits" in out


def test_vlap_opt_defaults_rematerialise_and_chunk_the_caption_loss():
    """The defaults that meet the plan-mode memory figures of bench/RESULTS.md."""
    config = load_config("vlap_opt:opt-1.3b")
    llm, _ = vlap.vlap_llm.load_llm(tiny_config().model, abstract=True)
    assert (config.model.llm_remat, config.model.caption_loss_chunk) == ("dots", 8)
    assert llm._loss_module.remat == "dots" and llm.loss_chunk == 8
