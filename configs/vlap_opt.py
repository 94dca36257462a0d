"""VLAP with a frozen CLIP ViT-B/32 and a frozen OPT (arXiv 2404.09632; ../shared/reference/methods.md).

    python -m lqae_vlap.main --config=configs/vlap_opt.py:opt-1.3b --workdir=$WORKDIR \
        --config.model.llm_path=/path/to/opt-1.3b --config.model.vision.path=/path/to/clip \
        --config.data.train_path=/path/to/cc3m_jsonl --config.data.eval_path=/path/to/val_jsonl \
        --config.word_marginal.source=/path/to/cc3m_opt_word_marginal.npy

Recipe (the authors' code defaults; the paper's appendix should be checked before quoting): CC3M,
batch 256, AdamW lr 1e-4 (OPT; 1e-2 for T5), 3 warm-up epochs then cosine decay, 32 epochs;
loss 0.1 * L_map + 1.0 * L_cap; Sinkhorn epsilon 0.01, 3 iterations; prediction temperature
tau 0.01; prompt "A picture of" before the caption. Trainable: one Dense(768 -> LLM width).

``get_config(arg)``: arg = the OPT size, e.g. ``configs/vlap_opt.py:opt-2.7b`` (default opt-1.3b);
it sets ``model.llm_path`` to ``facebook/<arg>`` (a local folder must be given without network).
"""

import ml_collections

CC3M_TRAIN_PAIRS = 3_318_333  # CC3M's training split as published; downloads usually hold fewer


def get_config(arg=None):
    size = arg or "opt-1.3b"
    c = ml_collections.ConfigDict()
    c.method = "vlap"
    c.mode = "train"  # train | eval
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1: the rest of the devices

    c.model = dict(
        llm_family="opt",  # 'opt' | 'llama' (HF folder or .gguf) | 't5' (not wired up yet)
        llm_path=f"facebook/{size}",  # HF hub name or local folder
        tokenizer_path="",  # "" = the LLM's own folder
        llm_dtype="float32",  # e.g. bfloat16 for the larger OPTs
        dtype="float32",  # compute dtype of the trainable Dense
        # Frozen vision tower; VLAP feeds its last hidden states (CLS + 49 patches for B/32).
        vision=dict(kind="clip", path="openai/clip-vit-base-patch32", dtype="float32",
                    patch_size=0, width=0, seed=0),
        image_size=224,
        prompt="A picture of",  # the caption follows with a leading space ("A picture of a dog")
        max_caption_len=32,  # caption tokens incl. EOS; longer captions are truncated
    )
    # L_map's Sinkhorn. 'paper': optimal transport whose word marginal is the word frequency
    # (what the paper describes). 'released_code': what the authors' script computes: a
    # per-sample softmax weighted by softmax(frequency / prior_temperature), cubed over its 3
    # iterations, which never normalises over the words (so no word marginal is enforced).
    c.sinkhorn = dict(mode="paper", epsilon=0.01, num_iters=3, prior_temperature=0.25)
    # Word marginal: 'uniform', 'count' (count the training captions at start-up: only for
    # sources that list them), or the path of a marginal saved by ops/word_frequency.py
    # (count_token_frequencies over CC3M with this LLM's tokenizer -> smooth -> save_marginal).
    c.word_marginal = dict(source="uniform", alpha=1.0, power=1.0)
    c.loss = dict(map=0.1, cap=1.0, temperature=0.01)

    c.data = dict(name="jsonl", train_path="", eval_path="", batch_size=256, seed=0,
                  num_workers=16)
    steps_per_epoch = CC3M_TRAIN_PAIRS // c.data.batch_size
    c.optim = dict(lr=1e-4, lr_scale_batch=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                   warmup_steps=3 * steps_per_epoch, grad_clip=0.0, end_lr_ratio=0.0)
    c.train = dict(steps=32 * steps_per_epoch, log_every=100, checkpoint_every=5000,
                   keep_checkpoints=3, eval_every=5000, init_from="", async_checkpoint=True)
    c.eval = dict(batch_size=64, num_batches=8, num_captions=16, max_new_tokens=30)
    return c
