"""VLAP with a frozen CLIP ViT-B/32 (or BEiT-Base) and a frozen T5 (arXiv 2404.09632).

    python -m lqae_vlap.main --config=configs/vlap_t5.py:t5-base --workdir=$WORKDIR \
        --config.model.llm_path=/path/to/t5-base --config.model.vision.path=/path/to/clip \
        --config.data.train_path=/path/to/cc3m_jsonl --config.data.eval_path=/path/to/val_jsonl

Same recipe as configs/vlap_opt.py except the LLM and lr 1e-2 (the authors' code default for T5).
For T5 the text representation of L_map is the ENCODER's last hidden states over the caption
(mean-pooled), and L_cap is the decoder's cross-entropy on the caption with
[projected visual tokens ; prompt] as the encoder input (methods/vlap_llm.py EncoderDecoderLLM).

``get_config(arg)``: arg = ``LLM[,VISION]``: the T5 checkpoint, e.g. ``t5-base`` (default) or
``google/flan-t5-base`` (a local folder must be given as llm_path without network), and
optionally after a comma the vision encoder by name as in configs/vlap_opt.py: ``clip-vit-b32``
(default) or ``beit-base``, e.g. ``configs/vlap_t5.py:t5-base,beit-base``.

Plan offline (no weights, no network), e.g. Flan-T5-XL on 8 devices of 16 GiB:

    python -m lqae_vlap.main --config=configs/vlap_t5.py:google/flan-t5-xl --workdir=/tmp/plan \
        --config.mode=plan --config.mesh.fsdp=8 --config.plan.num_devices=8

Plan mode builds the T5 from ``model.llm_arch`` (HF T5Config fields, presets below) whenever
llm_path is not a local folder; training and evaluation read the checkpoint's own config.json.
"""

from lqae_vlap import config_files

# The released checkpoints' architectures (their config.json). Shared: 32,128-word vocab (the
# SentencePiece model's 32,100 pieces padded), 32 relative-position buckets up to distance 128,
# pad 0 = decoder start, EOS 1.
_T5_COMMON = dict(model_type="t5", vocab_size=32128, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, layer_norm_epsilon=1e-6, pad_token_id=0,
                  eos_token_id=1, decoder_start_token_id=0)
# Original T5: ReLU FFN, lm head tied to the shared embedding (and the d_model**-0.5 rescale).
_T5 = dict(_T5_COMMON, feed_forward_proj="relu", tie_word_embeddings=True)
# T5 v1.1 / Flan-T5: gated-GELU FFN, an untied lm_head, no rescale.
_FLAN = dict(_T5_COMMON, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
_T5_SIZES = {  # name: (family preset, d_model, d_kv, d_ff, layers (enc = dec), heads)
    "t5-small": (_T5, 512, 64, 2048, 6, 8),
    "t5-base": (_T5, 768, 64, 3072, 12, 12),
    "t5-large": (_T5, 1024, 64, 4096, 24, 16),
    "flan-t5-small": (_FLAN, 512, 64, 1024, 8, 6),
    "flan-t5-base": (_FLAN, 768, 64, 2048, 12, 12),
    "flan-t5-large": (_FLAN, 1024, 64, 2816, 24, 16),
    "flan-t5-xl": (_FLAN, 2048, 64, 5120, 24, 32),
}


def t5_arch(name: str) -> dict:
    """HF T5Config fields of a released checkpoint ('t5-base', 'google/flan-t5-base'); {} if not
    listed (plan mode then needs --config.model.llm_arch or a local folder)."""
    name = name.rstrip("/").split("/")[-1]
    if name not in _T5_SIZES:
        return {}
    preset, d_model, d_kv, d_ff, layers, heads = _T5_SIZES[name]
    return dict(preset, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                num_decoder_layers=layers, num_heads=heads)


def get_config(arg=None):
    opt = config_files.load_sibling(__file__, "vlap_opt")
    llm, vision = opt.split_arg(arg, "t5-base")
    c = opt.get_config(f"opt-1.3b,{vision}")  # the shared recipe and this vision encoder
    c.model.llm_family = "t5"
    c.model.llm_path = llm
    c.model.llm_arch = t5_arch(c.model.llm_path)
    # Plan mode without a local tokenizer: "A picture of" is 3 SentencePiece tokens in T5
    # (▁A ▁picture ▁of).
    c.model.prompt_len = 3
    c.optim.lr = 1e-2
    return c
