"""configs/lqae_roberta.py (the paper config) follows the released LQAE run, row by row.

Each assertion is a setting of the authors' README command / lqae_main.py / lqae.py /
base_vit.py / data.py that this project's earlier paper config did not follow (the loss weights,
the straight-through input, the pixel range, the ViT), plus the rows it already followed (no
gradient clipping, the augmentation) so that they stay.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lqae_vlap.data import imagenet
from lqae_vlap.methods import lqae
from tests.helpers import load_config


def test_paper_config_losses_quantizer_pixels_and_optimiser_are_the_released_ones():
    c = load_config("lqae_roberta")
    # README: --lqae.bert_channel_image_loss_weight=1.0 --lqae.nochannel_image_loss_weight=0.0
    assert (c.loss.recon_lm, c.loss.recon_quantized) == (1.0, 0.0)
    assert (c.loss.commitment, c.loss.mlm, c.loss.mask_ratio_min, c.loss.mask_ratio_max) == (
        0.005, 1e-4, 0.5, 0.5)
    # LanguageQuantizer.__call__: only the search's copy is normalised.
    assert c.quantizer.metric == "cosine" and c.quantizer.straight_through_on == "raw"
    # ImageNetDataset(image_normalization='none'): ToTensor's [0, 1].
    assert tuple(c.model.pixel_range) == (0.0, 1.0)
    assert lqae.to_model_pixels(jnp.array([0, 255], jnp.uint8), c).tolist() == [0.0, 1.0]
    # lqae_main.py: clip_gradient=1e9 (none), AdamW (0.9, 0.95), lr 1.5e-4 x batch / 256.
    assert c.optim.grad_clip == 0.0 and (c.optim.b1, c.optim.b2) == (0.9, 0.95)
    # lqae_main.py builds optax.adamw without a mask: every trainable leaf is decayed.
    assert c.optim.weight_decay == 5e-4 and c.optim.weight_decay_mask == "all"
    assert c.optim.lr * c.data.batch_size / c.optim.lr_scale_batch == 3e-4
    # data.py transform_type 'pretrain': RandomResizedCrop(256, scale=(0.2, 1.0), bicubic) + flip.
    assert c.model.image_size == 256 and imagenet.TRAIN_SCALE == (0.2, 1.0)


def test_paper_config_probe_is_the_released_linear_probe():
    """lqae/main/linear_main.py: last_embedding_layers='all', optax.lars(momentum=0.9,
    weight_decay=1e-4), lr_peak_value 1e-4 x batch / 256, lr_warmup_epochs 0, 200 epochs (the
    earlier probe: one LM layer, AdamW at a constant 1e-2, 100 epochs)."""
    p = load_config("lqae_roberta").eval.probe
    assert (p.features, p.optimizer) == ("released", "lars")
    assert (p.lr, p.epochs, p.weight_decay, p.momentum) == (1e-4, 200, 1e-4, 0.9)
    assert p.cache_dtype == "float16"  # 19,200 values per image: 38.4 kB, not 76.8 kB


def test_paper_config_builds_the_released_vit():
    """base_vit.py: NormFormer blocks with a GLU + depthwise conv, no biases, every block
    rematerialised, no output projection (width 768 = RoBERTa-base's), no final LayerNorm."""
    c = load_config("lqae_roberta")
    assert c.model.architecture == "released" and c.model.remat
    model = lqae.LQAEModel(config=c.model, lm_width=768)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    p = nn.meta.unbox(abstract)["params"]
    enc, dec = p["encoder"], p["decoder"]
    assert "out_proj" not in enc and "in_proj" not in dec
    block = enc["transformer"]["block_11"]
    assert set(block) == {"ln_attn", "attn", "ln_attn_out", "mlp"}
    assert set(block["mlp"]) == {"ln_in", "fc1", "fc2", "dwconv", "ln_mid", "fc_out"}
    assert block["mlp"]["fc1"]["kernel"].shape == (768, 3072)
    assert "bias" not in block["attn"]["query"] and "ln_final" not in enc["transformer"]
    assert enc["pos_embed"].shape == (256, 768)  # the 16 x 16 patch grid
    assert dec["pixel_bias"].shape == (3,)


def test_laptop_configs_keep_the_plain_vit_and_the_demo_its_measured_settings():
    demo, tiny = load_config("lqae_demo"), load_config("lqae_tiny")
    for c in (demo, tiny):
        assert c.model.architecture == "plain" and not c.model.remat
    # The demo keeps what trained best on a CPU (its docstring gives the figures) ...
    assert demo.loss.recon_quantized == 1.0 and demo.quantizer.straight_through_on == "normalized"
    assert tuple(demo.model.pixel_range) == (-1.0, 1.0)
    # ... the tiny config, which the tests and the CLI check run, the paper's training path.
    assert tiny.loss.recon_quantized == 0.0 and tiny.quantizer.straight_through_on == "raw"
    assert tuple(tiny.model.pixel_range) == (0.0, 1.0)
