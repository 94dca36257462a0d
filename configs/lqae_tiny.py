"""The smallest LQAE that exercises every code path: for tests and quick checks on a CPU.

8x8 digits, 2x2 patches (16 tokens), one-block ViTs, the real MiniLM codebook by default
(tests point ``model.lm_path`` at a tiny random BERT they create). It keeps the demo's plain ViT
(tests/train/test_plan.py counts that ViT's parameters by hand; the released ViT has its own tests
in tests/models/test_vit_released.py and tests/methods/test_lqae.py), but not the demo's
CPU-tuned losses, straight-through and pixel range: it takes the paper config's (released) ones,
so that the tests and the CLI check run the paper's training path.
"""

from lqae_vlap import config_files


def get_config(arg=None):
    c = config_files.load_sibling(__file__, "lqae_demo").get_config(arg or "4")
    c.data.batch_size = 16
    c.model.image_size = 8
    c.model.patch_size = 2
    c.model.encoder = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.model.decoder = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.quantizer.chunk_size = 1024
    # The paper config's (released) settings, which the demo changes (see configs/lqae_demo.py).
    c.model.pixel_range = (0.0, 1.0)
    c.quantizer.straight_through_on = "raw"
    c.loss.recon_quantized = 0.0
    c.optim.warmup_steps = 1
    c.train.update(dict(log_every=1, checkpoint_every=2, keep_checkpoints=2, eval_every=0,
                        async_checkpoint=False))
    c.eval.update(dict(evals=("reconstruction",), batch_size=16, num_batches=1, num_images=4))
    c.eval.fewshot.update(dict(ways=(2,), shots=(1,), episodes=10, llm_episodes=2))
    c.eval.fewshot_frozen.update(dict(ways=(2,), inner_shots=(1,), episodes=2, max_new_tokens=3))
    c.eval.probe.epochs = 10
    return c
