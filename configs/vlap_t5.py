"""VLAP with a frozen CLIP ViT-B/32 and a frozen T5 (arXiv 2404.09632).

    python -m lqae_vlap.main --config=configs/vlap_t5.py:t5-base --workdir=$WORKDIR ...

Same recipe as configs/vlap_opt.py except the LLM and lr 1e-2 (the authors' code default for T5).
For T5 the text representation is the ENCODER's last hidden states over the caption, and the
captioning loss is the decoder's cross-entropy with the visual prefix + prompt as encoder input.
NOTE: methods/vlap.py does not wire T5 up yet; ``build`` raises NotImplementedError saying so.

``get_config(arg)``: arg = the T5 checkpoint, e.g. ``t5-base`` (default) or ``google/flan-t5-base``.
"""

from lqae_vlap import config_files


def get_config(arg=None):
    c = config_files.load_sibling(__file__, "vlap_opt").get_config()
    c.model.llm_family = "t5"
    c.model.llm_path = arg or "t5-base"
    c.optim.lr = 1e-2
    return c
