"""LQAE as in the paper: ViT-B/16 encoder and decoder, frozen RoBERTa-base codebook, ImageNet.

    python -m lqae_vlap.main --config=configs/lqae_roberta.py --workdir=$WORKDIR \
        --config.data.manual_dir=/path/to/imagenet_tars --config.data.data_dir=/path/to/tfds

Settings from arXiv 2302.00902 and its released run (see ../shared/reference/methods.md):
batch 512, AdamW (0.9, 0.95), lr 1.5e-4 per 256 images (3e-4 at 512), 5 warm-up epochs then
cosine, weight decay 5e-4 (not on biases, norms, embeddings), 100 epochs, commitment 0.005,
mask ratio 0.5, masked-LM weight 1e-4, both reconstructions weight 1.0. The released code adds its
commitment term twice (0.005 acts as 0.01): set --config.loss.commitment=0.01 to match it.

``get_config(arg)``: arg is the image size (default 256), e.g. ``configs/lqae_roberta.py:224``.
"""

import ml_collections

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    image_size = int(arg) if arg else 256
    c = ml_collections.ConfigDict()
    c.method = "lqae"
    c.mode = "train"  # train | eval
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1: the rest of the devices

    # on_bad_image: 'skip' replaces an unreadable image by the next readable example and counts
    # it (data/images.py); 'fail' stops at the first.
    c.data = dict(name="imagenet", batch_size=512, seed=0, num_workers=16,
                  data_dir="", manual_dir="", on_bad_image="skip")

    c.model = dict(
        lm_path="roberta-base",  # HF hub name or local folder (config.json + weights)
        lm_dtype="float32",
        dtype="float32",  # compute dtype of the trainable ViTs
        image_size=image_size, patch_size=16, channels=3, remat=False,
        encoder=dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
        decoder=dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    )
    # Nearest word by cosine; the encoder output is L2-normalised (l2_normalize=True in the
    # released run) and the RAW word vector goes on through the straight-through estimator.
    c.quantizer = dict(metric="cosine", l2_normalize=True, chunk_size=8192)
    c.loss = dict(recon_quantized=1.0, recon_lm=1.0, commitment=0.005, mlm=1e-4,
                  mask_ratio_min=0.5, mask_ratio_max=0.5)

    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.data.batch_size
    c.optim = dict(lr=1.5e-4, lr_scale_batch=256, b1=0.9, b2=0.95, eps=1e-8,
                   weight_decay=5e-4, warmup_steps=5 * steps_per_epoch, grad_clip=0.0,
                   end_lr_ratio=0.0)
    c.train = dict(steps=100 * steps_per_epoch, log_every=100, checkpoint_every=5000,
                   keep_checkpoints=3, eval_every=5000, init_from="", async_checkpoint=True)
    # Evaluations (methods/lqae_evals.py), each every eval.<name>.every steps, at the end, and
    # alone with --config.mode=eval. Few-shot: mini-ImageNet's test classes
    # (eval.mini_imagenet_root, with fewshot.split='mini_imagenet') as in the paper; fewshot_llm
    # prompts eval.llm_path.
    c.eval = dict(
        evals=("reconstruction",), batch_size=64, num_batches=8, num_images=8, max_images=0,
        mini_imagenet_root="", llm_path="",
        reconstruction=dict(every=-1),  # every: -1 = train.eval_every, 0 = only at the end
        # layer: the frozen LM's hidden state whose mean over the words is the feature
        # (transformers' indexing: 0 = embeddings, -1 = last).
        fewshot=dict(every=-1, split="validation", ways=(2, 5), shots=(1, 3, 5), queries=1,
                     episodes=100, llm_episodes=20, seed=0, layer=-1),
        fewshot_llm=dict(every=-1),  # its episodes are eval.fewshot's (llm_episodes of them)
        linear_probe=dict(every=-1),  # its knobs are eval.probe's
        probe=dict(epochs=100, lr=1e-2, weight_decay=1e-4, layer=-1),
    )
    # --config.mode=plan: devices to plan for when no accelerator is present (fake CPU devices),
    # memory per device, and the peak used to turn FLOPs into a step time (H100 bf16 dense).
    # flops_overrides: the quantizer searches the vocabulary in a loop whose body XLA's cost
    # analysis counts once; plan counts FLOPs on a second compile with a single chunk.
    c.plan = dict(num_devices=8, device_memory_gib=16.0, peak_tflops=989.0,
                  flops_overrides=dict(quantizer=dict(chunk_size=1 << 20)))
    return c
