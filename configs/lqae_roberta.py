"""LQAE as in the paper: ViT-B/16 encoder and decoder, frozen RoBERTa-base codebook, ImageNet.

    python -m lqae_vlap.main --config=configs/lqae_roberta.py --workdir=$WORKDIR \
        --config.data.manual_dir=/path/to/imagenet_tars --config.data.data_dir=/path/to/tfds

Settings from arXiv 2302.00902 and its released run (the authors' language-quantized-autoencoders,
one release commit; README training command, lqae/main/lqae_main.py, lqae/models/lqae.py,
lqae/models/base_vit.py, lqae/data/data.py). Following the released run:
  * losses (README flags, lqae_main.py get_loss): reconstruction through the frozen LM weight 1.0
    (bert_channel_image_loss_weight), straight from the quantized words 0.0
    (nochannel_image_loss_weight): ``loss.recon_lm=1.0, loss.recon_quantized=0.0``, so every
    gradient to the encoder's words passes through the LM (the paper's abstract: the decoder
    reconstructs "from BERT predicted text token embeddings"); commitment 0.005
    (quantizer_loss_commitment), masked-LM 1e-4 (bert_mask_loss_weight) on the masked positions,
    mask ratio 0.5 (bert_min_ratio = bert_max_ratio); option: --config.loss.recon_quantized=1.0
    adds the direct reconstruction (this project's earlier default);
  * quantizer (LanguageQuantizer.__call__, l2_normalize=True, top_k_value=1): nearest word by
    cosine, the raw word vector passed on, straight-through and commitment on the RAW encoder
    output: ``quantizer.straight_through_on='raw'``; option 'normalized' (L2-normalise the encoder
    output first, this project's earlier default);
  * ViT (base_vit.py): ``model.architecture='released'`` (models/vit_released.py: bias-free conv
    patches, NormFormer blocks, GLU + 3x3 depthwise conv, no biases, normal(0.02)), every block
    rematerialised (``model.remat=True``), width 768 = RoBERTa's, 12 layers, 12 heads, GLU width
    3072, patch 16; option 'plain' (models/vit.py, a pre-LayerNorm ViT-Base as the paper's text
    reads);
  * pixels (data.py ImageNetDataset, image_normalization='none'): floats in [0, 1]
    (``model.pixel_range=(0.0, 1.0)``), RandomResizedCrop(256, scale (0.2, 1.0), bicubic) +
    horizontal flip for training, resize + centre crop for evaluation (data/imagenet.py); option
    --config.model.pixel_range="(-1.0, 1.0)";
  * optimiser (lqae_main.py): batch 512, AdamW (0.9, 0.95), lr 1.5e-4 per 256 images (3e-4 at
    512), 5 warm-up epochs then cosine to 0, weight decay 5e-4 on EVERY trainable parameter
    (the get_weight_decay_mask lqae_main.py defines is never passed to optax.adamw:
    ``optim.weight_decay_mask='all'``; 'matrices' spares biases, norms and embeddings), 100
    epochs, no gradient clipping (clip_gradient=1e9: ``optim.grad_clip=0.0``).
Known differences kept: the released code adds its commitment term twice (0.005 acts as 0.01):
set --config.loss.commitment=0.01 to match it.

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
    # it (data/images.py); 'fail' stops at the first. worker_processes: grain worker processes
    # that compute the training batches (each with num_workers threads; 0: num_workers threads
    # in the trainer's process); the same batches either way (data/batches.py).
    c.data = dict(name="imagenet", batch_size=512, seed=0, num_workers=16, worker_processes=8,
                  data_dir="", manual_dir="", on_bad_image="skip")

    c.model = dict(
        lm_path="roberta-base",  # HF hub name or local folder (config.json + weights)
        lm_dtype="float32",
        dtype="float32",  # compute dtype of the trainable ViTs
        # released | plain (see the docstring); remat: every block rematerialised, as released.
        architecture="released", remat=True,
        # Floats the ViT reads and the reconstruction targets: [0, 1] as the released loader.
        pixel_range=(0.0, 1.0),
        image_size=image_size, patch_size=16, channels=3,
        encoder=dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
        decoder=dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    )
    # Nearest word by cosine (the released l2_normalize=True normalises the search's copies); the
    # RAW word vector goes on, and the straight-through and commitment see the raw encoder output.
    # codebook: 'lm' (LQAE: the frozen LM's words) or 'learned' (the paper's VQ-VAE baseline, the
    # authors' strawman_codebook: a trained table of the LM's [V, D], init normal(learned_init_std)
    # as theirs, trained by loss.codebook; its code i is the LM's word i wherever an LM reads it).
    c.quantizer = dict(metric="cosine", straight_through_on="raw", chunk_size=8192,
                       codebook="lm", learned_init_std=0.02)
    # As released: the image is reconstructed only through the frozen LM. codebook: the VQ-VAE
    # codebook term's weight (quantizer.codebook='learned' only; the authors' q_latent_loss, 1.0).
    # spread: weight of the mean squared cosine between the batch's encoder tokens (not in the
    # released run; against codebook collapse, configs/lqae_scenes.py).
    c.loss = dict(recon_quantized=0.0, recon_lm=1.0, commitment=0.005, mlm=1e-4,
                  mask_ratio_min=0.5, mask_ratio_max=0.5, codebook=1.0, spread=0.0)

    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.data.batch_size
    c.optim = dict(lr=1.5e-4, lr_scale_batch=256, b1=0.9, b2=0.95, eps=1e-8,
                   weight_decay=5e-4, weight_decay_mask="all", warmup_steps=5 * steps_per_epoch,
                   grad_clip=0.0, end_lr_ratio=0.0)
    c.train = dict(steps=100 * steps_per_epoch, log_every=100, checkpoint_every=5000,
                   keep_checkpoints=3, eval_every=5000, init_from="", async_checkpoint=True)
    # Evaluations (methods/lqae_evals.py), each every eval.<name>.every steps, at the end, and
    # alone with --config.mode=eval. Few-shot: mini-ImageNet's test classes
    # (eval.mini_imagenet_root, with fewshot.split='mini_imagenet') as in the paper; fewshot_llm
    # and fewshot_frozen prompt eval.llm_path.
    c.eval = dict(
        evals=("reconstruction",), batch_size=64, num_batches=8, num_images=8, max_images=0,
        mini_imagenet_root="", llm_path="",
        # {WordNet id: name} for mini-ImageNet's class names (real-name prompts): a synset
        # mapping text file ("n01532829 house finch, linnet") or a JSON object; "" = the ids.
        mini_imagenet_label_names="",
        reconstruction=dict(every=-1),  # every: -1 = train.eval_every, 0 = only at the end
        # layer: the frozen LM's hidden state whose mean over the words is the feature
        # (transformers' indexing: 0 = embeddings, -1 = last).
        fewshot=dict(every=-1, split="validation", ways=(2, 5), shots=(1, 3, 5), queries=1,
                     episodes=100, llm_episodes=20, seed=0, layer=-1),
        fewshot_llm=dict(every=-1),  # its episodes are eval.fewshot's (llm_episodes of them)
        # Frozen's protocol (Tsimpoukelli et al. 2021; evals/fewshot_frozen.py) with eval.llm_path:
        # names 'nonsense' (Open-Ended: dax, blicket, ... per episode) or 'real' (Real-Name; on
        # mini-ImageNet needs eval.mini_imagenet_label_names); repeats = EXTRA copies of the
        # support block (Frozen's convention: 0 = each support image shown once); the LLM generates max_new_tokens greedily, scored by exact match.
        # prompt_policy: 'truncate_words' (fewer evenly spaced words per image so the prompt fits
        # the LLM's max_position_embeddings) or 'error'. text_mode: fewshot.image_text's mode.
        # ranking: also score the likelihood of each of the episode's names (ways x the
        # generation's prompt rows; False: exact match only).
        fewshot_frozen=dict(every=-1, split="validation", names="nonsense", ways=(2, 5),
                            inner_shots=(1, 3, 5), repeats=0, queries=1, episodes=20, seed=0,
                            task_induction=True, max_new_tokens=8,
                            prompt_policy="truncate_words", text_mode="decode", ranking=True),
        linear_probe=dict(every=-1),  # its knobs are eval.probe's
        # The released probe (lqae/main/linear_main.py; evals/linear_probe.py): features
        # 'released' = every ViT-encoder block's and every LM hidden state's mean over the tokens
        # after the first, concatenated (19,200 wide here; cached as cache_dtype), or 'lm_layer' =
        # LM hidden state `layer` averaged over the words; LayerNorm + Dense trained with
        # optimizer 'lars' (or 'adamw'), peak lr = lr * batch_size / 256, cosine to 0, no
        # warm-up. batch_size: not recorded in the release (its flag defaults to 0); 0 = full.
        probe=dict(features="released", layer=-1, optimizer="lars", lr=1e-4, epochs=200,
                   batch_size=1024, weight_decay=1e-4, momentum=0.9, cache_dtype="float16"),
    )
    # --config.mode=plan: devices to plan for when no accelerator is present (fake CPU devices),
    # memory per device, and the peak that turns FLOPs into a step time (TFLOP/s per device;
    # 0 = the target's chip: an H100's bf16 dense 989 for 'cpu', a v5e's 197 for 'tpu:v5e:..').
    # flops_overrides: the quantizer searches the vocabulary in a loop whose body XLA's cost
    # analysis counts once; plan counts FLOPs on a second compile with a single chunk.
    # target / libtpu: 'cpu', or a TPU topology compiled ahead of time (configs/vlap_opt.py).
    c.plan = dict(num_devices=8, device_memory_gib=16.0, peak_tflops=0.0,
                  flops_overrides=dict(quantizer=dict(chunk_size=1 << 20)),
                  target="cpu", libtpu="")
    return c
