"""VLAP with a frozen CLIP ViT-B/32 (or BEiT-Base) and a frozen OPT (arXiv 2404.09632;
../shared/reference/methods.md).

    python -m lqae_vlap.main --config=configs/vlap_opt.py:opt-1.3b --workdir=$WORKDIR \
        --config.model.llm_path=/path/to/opt-1.3b --config.model.vision.path=/path/to/clip \
        --config.data.train_path=/path/to/cc3m_jsonl --config.data.eval_path=/path/to/val_jsonl

(the word marginal is counted over data.train_path's captions on the first run and reused after;
--config.word_marginal.source=/path/to/marginal.npy gives one saved elsewhere.)

Recipe (the authors' code defaults; the paper's appendix should be checked before quoting): CC3M,
batch 256, AdamW lr 1e-4 (OPT; 1e-2 for T5), 3 warm-up epochs then cosine decay, 32 epochs;
loss 0.1 * L_map + 1.0 * L_cap; Sinkhorn epsilon 0.01, 3 iterations; prediction temperature
tau 0.01; prompt "A picture of" before the caption. Trainable: one Dense(768 -> LLM width).

``get_config(arg)``: arg = ``LLM[,VISION]``: the OPT size, e.g. ``configs/vlap_opt.py:opt-2.7b``
(default opt-1.3b), which sets ``model.llm_path`` to ``facebook/<size>`` (a local folder must be
given without network), and optionally after a comma the vision encoder by name, one of
``VISION_ENCODERS`` below: ``clip-vit-b32`` (default) or ``beit-base``, e.g.
``configs/vlap_opt.py:opt-1.3b,beit-base`` (the paper's grid is {CLIP ViT-B/32, BEiT-Base} x
{T5-base, OPT-1.3B}); it sets ``model.vision.kind``, ``.path`` and ``.arch``.

Plan offline (no weights, no network) whether a size fits, e.g. on 8 devices of 16 GiB:

    python -m lqae_vlap.main --config=configs/vlap_opt.py:opt-6.7b --workdir=/tmp/plan \
        --config.mode=plan --config.mesh.fsdp=8 --config.plan.num_devices=8 \
        --config.plan.device_memory_gib=16

Plan mode builds the architectures from ``model.llm_arch`` / ``model.vision.arch`` (Hugging Face
config fields, presets below) whenever the checkpoint path is not a local folder; training and
evaluation always read the real checkpoint's own config.json and weights.
"""

import ml_collections

CC3M_TRAIN_PAIRS = 3_318_333  # CC3M's training split as published; downloads usually hold fewer

# The released OPT checkpoints' architectures (facebook/opt-*/config.json; OPT paper, Table 1).
# Shared by all sizes: vocab 50272, 2048 positions, ReLU, tied head, pad 1 / bos 2 / eos 2.
# opt-350m alone projects its 1024-wide model to 512-wide word embeddings and is post-LN.
_OPT_COMMON = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048,
                   activation_function="relu", do_layer_norm_before=True, enable_bias=True,
                   tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)
_OPT_SIZES = {  # name: (hidden, layers, heads, ffn, word_embed_proj_dim)
    "opt-125m": (768, 12, 12, 3072, 768),
    "opt-350m": (1024, 24, 16, 4096, 512),
    "opt-1.3b": (2048, 24, 32, 8192, 2048),
    "opt-2.7b": (2560, 32, 32, 10240, 2560),
    "opt-6.7b": (4096, 32, 32, 16384, 4096),
    "opt-13b": (5120, 40, 40, 20480, 5120),
    "opt-30b": (7168, 48, 56, 28672, 7168),
    "opt-66b": (9216, 64, 72, 36864, 9216),
}


def opt_arch(size: str) -> dict:
    """HF OPTConfig fields of a released OPT size ('opt-6.7b'); {} for a size not listed."""
    if size not in _OPT_SIZES:
        return {}
    hidden, layers, heads, ffn, proj = _OPT_SIZES[size]
    return dict(_OPT_COMMON, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, ffn_dim=ffn, word_embed_proj_dim=proj,
                do_layer_norm_before=size != "opt-350m")


# openai/clip-vit-base-patch32's vision tower (HF CLIPVisionConfig fields).
CLIP_VIT_B32 = dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, patch_size=32, image_size=224,
                    num_channels=3, projection_dim=512, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5)
# microsoft/beit-base-patch16-224-pt22k (HF BeitConfig fields; what VLAP's authors load). That
# checkpoint's config.json was written by HF's convert_beit_unilm_to_pytorch.py for "pt22k":
# BeitConfig()'s defaults (768 wide, 12 layers of 12 heads, FFN 3072, patch 16 at 224, exact GELU,
# eps 1e-12, layer scale 0.1, mean pooling, no absolute positions, DALL-E's 8192-token vocab) plus
# use_shared_relative_position_bias and use_mask_token. use_mean_pooling stays True: the script
# loads the weights strictly into BeitForMaskedImageModeling, whose BeitModel then has no final
# LayerNorm (the checkpoint's 'layernorm' is the MIM head's), so the 197 tokens VLAP feeds are the
# last block's output unnormalised, as in the authors' BeitModel(...).last_hidden_state.
BEIT_BASE = dict(model_type="beit", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, patch_size=16, image_size=224, num_channels=3,
                 hidden_act="gelu", layer_norm_eps=1e-12, vocab_size=8192, use_mask_token=True,
                 use_absolute_position_embeddings=False, use_relative_position_bias=False,
                 use_shared_relative_position_bias=True, layer_scale_init_value=0.1,
                 use_mean_pooling=True)

# The vision encoders by name (get_config's arg after the comma): config.model.vision's
# kind (methods/vlap_vision.py TOWERS), hub name, and plan-mode architecture.
VISION_ENCODERS = {
    "clip-vit-b32": dict(kind="clip", path="openai/clip-vit-base-patch32", arch=CLIP_VIT_B32),
    "beit-base": dict(kind="beit", path="microsoft/beit-base-patch16-224-pt22k", arch=BEIT_BASE),
}


def split_arg(arg, default_llm):
    """'LLM[,VISION]' -> (llm, vision encoder name); empty parts default to ``default_llm`` and
    'clip-vit-b32'."""
    llm, _, vision = (arg or "").partition(",")
    vision = vision.strip() or "clip-vit-b32"
    if vision not in VISION_ENCODERS:
        raise ValueError(f"vision encoder {vision!r} (after the comma in --config=FILE:LLM,VISION)"
                         f" is not known; use one of {', '.join(VISION_ENCODERS)}")
    return llm.strip() or default_llm, vision


def get_config(arg=None):
    size, vision_name = split_arg(arg, "opt-1.3b")
    vision = VISION_ENCODERS[vision_name]
    c = ml_collections.ConfigDict()
    c.method = "vlap"
    c.mode = "train"  # train | eval
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1: the rest of the devices

    c.model = dict(
        llm_family="opt",  # 'opt' | 'llama' (HF folder or .gguf) | 't5' (configs/vlap_t5.py)
        llm_path=f"facebook/{size}",  # HF hub name or local folder
        # Plan mode only, when llm_path is not a local folder: the LLM's HF config fields.
        llm_arch=opt_arch(size.split("/")[-1]),
        tokenizer_path="",  # "" = the LLM's own folder
        llm_dtype="float32",  # e.g. bfloat16 for the larger OPTs
        # Memory of L_cap's pass through the frozen LLM (methods/vlap_llm.py; figures in
        # bench/RESULTS.md, "Memory at the papers' scale"). llm_remat: 'none' | 'dots' (keep
        # the weight matmuls' outputs, recompute attention, activations and norms: +0.2% FLOPs
        # per step for opt-1.3b) | 'full' (rerun each layer: +26% FLOPs) | 'auto' (plan mode
        # only: the cheapest that fits). caption_loss_chunk: caption tokens per chunk of the
        # vocabulary cross-entropy, scored at the caption positions only (0 = the model's
        # full logits at every position); it removes the prefix's head FLOPs (-4% per step).
        # Plan mode, opt-1.3b bf16 on 8 x 16 GiB: 13.34 GiB per device with none/0, 11.20 with
        # dots/8; opt-6.7b fsdp 8: 34.56 -> 15.19 GiB (XLA:CPU). For 8 TPU v5e chips
        # (plan.target='tpu:v5e:2x4'): opt-1.3b 6.67 (none/0), 5.72 (dots/8), 3.29 (full/8);
        # opt-6.7b fsdp 8 9.76 (dots/8), 4.58 (full/8).
        llm_remat="dots",
        caption_loss_chunk=8,
        dtype="float32",  # compute dtype of the trainable Dense
        # Frozen vision tower (kind 'clip' | 'beit', from the arg); VLAP feeds its last hidden
        # states (CLS + patches: 50 tokens for CLIP B/32, 197 for BEiT-Base/16).
        # arch: plan mode only, when path is not a local folder (HF vision config fields).
        vision=dict(kind=vision["kind"], path=vision["path"], dtype="float32",
                    patch_size=0, width=0, seed=0, arch=vision["arch"]),
        image_size=224,
        prompt="A picture of",  # the caption follows with a leading space ("A picture of a dog")
        prompt_len=3,  # plan mode without a local tokenizer: tokens in the prompt (OPT's BPE)
        max_caption_len=32,  # caption tokens incl. EOS; longer captions are truncated
    )
    # L_map's Sinkhorn. 'paper': optimal transport whose word marginal is the word frequency
    # (what the paper describes). 'released_code': what the authors' script computes: a
    # per-sample softmax weighted by softmax(frequency / prior_temperature), cubed over its 3
    # iterations, which never normalises over the words (so no word marginal is enforced).
    # impl: 'lax' (default, any backend), 'pallas' (the fused kernel of ops/sinkhorn_pallas.py:
    # Triton on GPU, rows split over data/fsdp with column sums all-reduced; not yet timed on a
    # GPU, and the batch must divide by the data x fsdp devices) or 'auto' (pallas on a GPU).
    c.sinkhorn = dict(mode="paper", epsilon=0.01, num_iters=3, prior_temperature=0.25,
                      impl="lax")
    # Word marginal of the Sinkhorn (ops/word_frequency.py word_marginal). 'frequency' (the
    # paper's): the frequency of the training captions (data.train_path) under this LLM's
    # tokenizer, (n_k + alpha) ** power normalised; counted once (3.3M CC3M-sized captions: ~100 s
    # on one core, bench/RESULTS.md; the tokenizer uses every core), saved as .npy + .json provenance in cache_dir ('' =
    # ~/.cache/lqae_vlap/word_marginals, or $XDG_CACHE_HOME/...) under a key of (data, split,
    # number of captions, tokenizer, vocab size, smoothing), and loaded by every later run with
    # that key; start-up prints "word marginal: CC3M train, OPT tokenizer (...), 50,272 words, ...".
    # 'count': counted every run, not saved. 'uniform': 1/V (only when asked for). Or the path of a
    # marginal saved by save_marginal (e.g. counted on another machine).
    c.word_marginal = dict(source="frequency", alpha=1.0, power=1.0, cache_dir="")
    c.loss = dict(map=0.1, cap=1.0, temperature=0.01)

    # Training pairs. 'cc3m': img2dataset output folders (train_path: CC3M's training TSV,
    # eval_path: its validation TSV); 'coco_captions': TFDS (data_dir, Karpathy splits
    # train_split / eval_split); 'jsonl': folders of {"image", "caption"} lines. index_cache_dir
    # keeps the sources' caption indexes between runs.
    # batch_size is the GLOBAL batch (all devices and hosts together), which is also the batch
    # L_map's Sinkhorn transports over. The released script's 256 is PER GPU (DDP with a
    # DistributedSampler; its Sinkhorn is per sample, so batch-independent) on a number of GPUs
    # it does not state: --config.data.batch_size=<256 * GPUs> reproduces it (its lr is not
    # scaled with the GPUs, so keep optim.lr_scale_batch=0). on_bad_image: 'skip' replaces an
    # example whose image is missing or cannot be decoded by the next readable one and counts
    # it (data/images.py); 'fail' stops at the first. worker_processes: grain worker processes
    # that compute the training batches (each with num_workers threads; 0: num_workers threads
    # in the trainer's process); the same batches either way (data/batches.py).
    c.data = dict(name="cc3m", train_path="", eval_path="", data_dir="", train_split="train",
                  eval_split="val", index_cache_dir="", batch_size=256, seed=0, num_workers=16,
                  worker_processes=8,
                  on_bad_image="skip")
    # The frozen vision features computed once and memory-mapped (data/feature_cache.py), keyed
    # by model + preprocessing + data. CC3M x 50 tokens x 768 is ~0.5 TB in float32 (BEiT's 197
    # tokens ~2 TB; float16 halves it, at ~1e-3 relative change of the features), so it is off
    # by default.
    c.data.feature_cache = dict(enabled=False, dir="", dtype="float32", batch_size=256)
    steps_per_epoch = CC3M_TRAIN_PAIRS // c.data.batch_size
    # The released optimiser: torch.optim.AdamW(model.parameters(), lr) with torch's defaults
    # (betas 0.9 / 0.999, eps 1e-8, weight_decay 0.01, decoupled) on the Dense's kernel AND bias
    # (weight_decay_mask 'all'; 'matrices' spares the bias); no gradient clipping; lr linear from
    # 0 over 3 epochs, then cosine to 0 (final_lr 0) per step.
    c.optim = dict(lr=1e-4, lr_scale_batch=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                   weight_decay_mask="all", warmup_steps=3 * steps_per_epoch, grad_clip=0.0,
                   end_lr_ratio=0.0)
    c.train = dict(steps=32 * steps_per_epoch, log_every=100, checkpoint_every=5000,
                   keep_checkpoints=3, eval_every=5000, init_from="", async_checkpoint=True)
    # Evaluations (methods/vlap_evals.py), each every eval.<name>.every steps, at the end, or
    # alone with --config.mode=eval on a checkpoint. Add "vqa" with eval.vqa.source="vqav2" or
    # "okvqa" and the official files (questions / annotations JSON, COCO image folder:
    # data/vqa_source.py); shots > 0 shows that many solved TRAIN examples first (each its own
    # image; shot_questions / shot_annotations / shot_image_dir), drawn per question with
    # shot_seed, each followed by shot_separator.
    c.eval = dict(
        evals=("loss", "captioning", "retrieval", "arithmetic"),
        # Held-out images with their references: '' = the training data's held-out split;
        # 'coco_captions' (TFDS, split 'test' = Karpathy 5k test) or 'jsonl' (path).
        source=dict(name="coco_captions", split="test", path=""),
        batch_size=64, num_batches=8, max_images=0,  # 0 = every held-out image
        loss=dict(every=-1),  # every: -1 = train.eval_every, 0 = only at the end
        # Greedy and beam-5 decoding of up to 30 tokens for each of the 5k test images costs far
        # more than the 8-batch loss: every 25k steps (5 loss evaluations), and at the end.
        # source: '' = eval.source's images; 'nocaps' = NoCaps validation (annotations: the
        # path of nocaps_val_4500_captions.json, image_dir: its Open Images validation images;
        # data/nocaps.py), scored overall and per domain.
        captioning=dict(every=25_000, num_beams=(1, 5), max_new_tokens=30, length_penalty=1.0,
                        max_images=0, metrics=("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"),
                        num_show=8, source="", annotations="", image_dir=""),
        # similarities (each reported, side by side): 'word_scores' (cosine of the two [V]
        # word-score profiles L_map aligns), 'embedding', 'caption_likelihood' (the LLM's
        # log-likelihood of the caption after the image: one pass per pair, galleries only,
        # <= max_pairs per gallery). Which one the paper ranks by is not known (vlap_evals.py).
        # source: '' = eval.source's images (Karpathy 5k test by default); 'flickr30k' (Karpathy's
        # dataset_flickr30k.json as annotations, flickr30k-images/ as image_dir) or 'coco'
        # (dataset_coco.json and the folder holding val2014/, or with annotations '' TFDS
        # coco_captions from data.data_dir), split 'test' (data/karpathy_splits.py): the whole
        # split as one gallery (1k / 5k images), as the papers. gallery_size (source '' only):
        # 0 = all images at once, every caption its own column. num_show: queries in the
        # pictures retrieval_{t2i,i2t}_STEP.png (top 5 each, by the first similarity).
        # likelihood_gallery_size > 0: caption_likelihood ranks galleries of its own of that many
        # images (at most likelihood_galleries of them; 0 = all), the others as above.
        retrieval=dict(every=-1, similarities=("word_scores", "embedding"), gallery_size=0,
                       ks=(1, 5, 10), max_pairs=100_000, num_show=6, source="", annotations="",
                       image_dir="", split="test", likelihood_gallery_size=0,
                       likelihood_galleries=0),
        vqa=dict(every=-1, source="", questions="", annotations="", image_dir="",
                 template="Question: {question} Answer:", max_new_tokens=10, max_questions=0,
                 num_show=5, shots=0, shot_seed=0, shot_separator="\n", shot_questions="",
                 shot_annotations="", shot_image_dir=""),
        # image - word(a) + word(b) -> nearest image, scored when captions name a and b.
        arithmetic=dict(every=-1, pairs=("dog->cat", "man->woman", "grass->snow", "day->night"),
                        top_k=5, num_show=5),
    )
    # --config.mode=plan: devices to plan for when no accelerator is present (fake CPU devices),
    # memory per device, and the peak that turns FLOPs into a step time (TFLOP/s per device;
    # 0 = the target's chip: an H100's bf16 dense 989 for 'cpu', a v5e's 197 for 'tpu:v5e:..').
    # Sinkhorn is not corrected: XLA counts the body of its 3-iteration loop once (checked:
    # num_iters 3 and 30 report the same FLOPs), but the uncounted iterations are ~7 FLOPs
    # per (sample, word) each, ~1e8 per step at batch 256, under 1e-6 of the frozen LLM's
    # forward and backward (1.4e14 for opt-1.3b).
    # The chunked caption loss is a scan that XLA also counts once: the counting compile scores
    # the caption in one chunk (the same FLOPs, recompute included). cpu_memory_scheduler:
    # train/plan.py's docstring. target: 'cpu' (fake CPU devices) or a TPU topology compiled
    # ahead of time by libtpu on this machine, e.g. 'tpu:v5e:2x4' (8 chips of 16 GiB; then
    # --config.mesh.* must use 8 devices); libtpu: libtpu.so or a pip --target folder holding it
    # ('' : the installed jax[tpu], or $TPU_LIBRARY_PATH).
    c.plan = dict(num_devices=8, device_memory_gib=16.0, peak_tflops=0.0,
                  flops_overrides={"model": {"caption_loss_chunk": 4096}},
                  cpu_memory_scheduler=True, target="cpu", libtpu="")
    return c
