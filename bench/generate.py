"""Greedy generation speed: our JAX OPT / T5 vs transformers' PyTorch ``generate(do_sample=False)``.

    python bench/generate.py --preset opt-125m --dtype float32            # CPU-sized
    python bench/generate.py --preset opt-1.3b --dtype bfloat16 --out gen.json   # accelerator

Both sides run the SAME random-init weights of a real model size (speed does not depend on the
values): a random transformers model is saved to a temp folder and read back with our ``load``.
Every row generates exactly ``--new-tokens`` tokens after a ``--prompt-len`` random prompt:
transformers gets ``min_new_tokens = max_new_tokens`` (as in /work/shared/reference/
anchor_generate.py, whose 'opt-1.3b' and 'flan-t5-base' configs the presets copy), ours gets an
EOS id that never occurs. Timing excludes compilation (one warm-up call), blocks until the
result is ready and takes the median of ``--reps`` calls. Before timing, the first tokens of both
sides are compared in float32 (a sanity check that both run the same model; it is printed).
Prints a Markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lqae_vlap.models import generate as gen  # noqa: E402
from lqae_vlap.models import opt, t5  # noqa: E402

# Real model sizes; the large two are the anchor's configs verbatim.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "opt-125m": ("opt", dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                             num_attention_heads=12, max_position_embeddings=2048,
                             word_embed_proj_dim=768)),
    "opt-1.3b": ("opt", dict(vocab_size=50272, hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
                             num_attention_heads=32, max_position_embeddings=2048,
                             word_embed_proj_dim=2048)),
    "t5-small": ("t5", dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                            num_heads=8, feed_forward_proj="relu", tie_word_embeddings=True,
                            decoder_start_token_id=0)),
    "flan-t5-base": ("t5", dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                                num_heads=12, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, decoder_start_token_id=0)),
}
PROMPT_IDS = {"opt": (3, 50000), "t5": (3, 32000)}  # the anchor's torch.randint ranges
DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}
CHECK_TOKENS = 8  # leading tokens compared in the float32 sanity check


def median_seconds(run: Callable[[], Any], sync: Callable[[Any], Any], reps: int) -> float:
    sync(run())  # compile / warm up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Ours:
    """Our JAX model behind one call: prompts [B, L] int32 -> generated tokens [B, new]."""

    def __init__(self, family: str, folder: str, dtype: Any, new_tokens: int):
        self.family, self.new = family, new_tokens
        if family == "opt":
            module, self.variables, _ = opt.load(folder, dtype=dtype)
            # Built once: the callables are static args of the jit (a fresh one recompiles).
            self.apply_fn = module.apply
            self.cache = opt.cache_fn(module.config, dtype=dtype)
        else:
            module, self.variables, _ = t5.load(folder, dtype=dtype)
            # An EOS id outside the vocabulary never occurs: every row runs all steps.
            self.module = module.clone(config=dataclasses.replace(module.config, eos_token_id=-1))

    def __call__(self, ids: jax.Array) -> jax.Array:
        if self.family == "opt":
            return gen.greedy_search(self.apply_fn, self.variables, input_ids=ids,
                                     attention_mask=jnp.ones_like(ids), max_new_tokens=self.new,
                                     eos_token_id=None, pad_token_id=1, init_cache_fn=self.cache)
        return t5.greedy_generate(self.module, self.variables, ids,
                                  max_new_tokens=self.new)["sequences"][:, 1:]


def torch_generate(model: Any, family: str, ids: torch.Tensor, new: int) -> torch.Tensor:
    """transformers greedy generate of exactly ``new`` tokens: [B, L] -> [B, new]."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False)
    # Decoder-only output repeats the prompt; encoder-decoder output starts with the start token.
    return out[:, ids.shape[1]:] if family == "opt" else out[:, 1:]


def random_model(family: str, cfg: dict[str, Any]) -> Any:
    torch.manual_seed(0)
    if family == "opt":
        return T.OPTForCausalLM(T.OPTConfig(**cfg)).eval()
    model = T.T5ForConditionalGeneration(T.T5Config(**cfg)).eval()
    # transformers' T5 init makes every greedy token the pad id 0, which would make the sanity
    # check vacuous; N(0, 0.05) weights (norms kept at 1) give varied tokens at the same speed.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0.0, 0.05, generator=g)
    return model


def sanity_check(family: str, folder: str, model: Any, prompts: np.ndarray) -> dict[str, Any]:
    """float32, both sides: how many leading tokens agree per row (of CHECK_TOKENS)."""
    model = model.to(torch.float32)
    theirs = torch_generate(model, family, torch.from_numpy(prompts), CHECK_TOKENS).numpy()
    ours = np.asarray(Ours(family, folder, jnp.float32, CHECK_TOKENS)(jnp.asarray(prompts)))
    return compare(ours, theirs)


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict[str, Any]:
    n = min(CHECK_TOKENS, ours.shape[1])
    same = ours[:, :n] == theirs[:, :n]
    # Leading agreement: after a first argmax tie-break difference the rows legitimately diverge.
    lead = np.where(same.all(1), n, np.argmin(same, axis=1))
    return dict(tokens_compared=int(n), rows=int(len(lead)), rows_all_equal=int((lead == n).sum()),
                min_leading_equal=int(lead.min()), ours_row0=ours[0, :n].tolist(),
                theirs_row0=theirs[0, :n].tolist())


def run(name: str, preset: tuple[str, dict[str, Any]], dtype: str, batches: list[int],
        new_tokens: int, prompt_len: int, reps: int, torch_device: str = "cpu",
        sanity_float32: bool = True) -> dict[str, Any]:
    """Times ours and transformers on random weights of ``preset`` = (family, HF config fields).

    torch_device: where transformers runs ('cuda' on a GPU machine; ours runs on JAX's default
    device). sanity_float32: compare both sides' first tokens in float32 (for another dtype an
    extra float32 load and run of both); False compares the first timed outputs in ``dtype``
    instead (free, but bfloat16 rounding may legitimately make greedy paths part early).
    Returns the results dict (rows: batch, seconds and tokens/s per side, ratio).
    """
    family, cfg = preset
    jdtype, tdtype = DTYPES[dtype]
    lo, hi = PROMPT_IDS[family]
    hi = min(hi, cfg["vocab_size"])
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(lo, hi, (b, prompt_len)).astype(np.int64) for b in batches}
    model = random_model(family, cfg)
    results: dict[str, Any] = dict(
        preset=name, dtype=dtype, new_tokens=new_tokens, prompt_len=prompt_len,
        reps=reps, jax=jax.__version__, torch=torch.__version__,
        transformers=T.__version__, device=str(jax.devices()[0].device_kind),
        torch_device=torch_device, cpu=platform.processor(), cpu_count=os.cpu_count(), rows=[],
        sanity_dtype="float32" if sanity_float32 else dtype)
    if not sanity_float32:
        model = model.to(tdtype)  # half the bytes to write and read back
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        check_prompts = prompts[batches[0]][:2]
        if dtype != "float32" and sanity_float32:
            results["sanity"] = sanity_check(family, folder, model, check_prompts)
            print("sanity (float32, first tokens):", results["sanity"], flush=True)
        ours = Ours(family, folder, jdtype, new_tokens)
    model = model.to(torch_device, tdtype)
    on_gpu = torch_device.startswith("cuda")
    sync_torch = (lambda x: torch.cuda.synchronize()) if on_gpu else (lambda x: x)

    for b in batches:
        ids_j = jnp.asarray(prompts[b], jnp.int32)
        ids_t = torch.from_numpy(prompts[b]).to(torch_device)
        if "sanity" not in results:
            # The timed outputs double as the sanity check (float32 here, or asked for).
            results["sanity"] = compare(
                np.asarray(ours(ids_j)),
                torch_generate(model, family, ids_t, new_tokens).cpu().numpy())
            print(f"sanity ({dtype}, first tokens):", results["sanity"], flush=True)
        t_ours = median_seconds(lambda: ours(ids_j), jax.block_until_ready, reps)
        t_hf = median_seconds(lambda: torch_generate(model, family, ids_t, new_tokens),
                              sync_torch, reps)
        row = dict(batch=b, ours_s=t_ours, hf_s=t_hf, ours_tok_s=b * new_tokens / t_ours,
                   hf_tok_s=b * new_tokens / t_hf, ratio=t_hf / t_ours)
        results["rows"].append(row)
        print(f"{name} batch {b}: ours {row['ours_tok_s']:.1f} tok/s, transformers "
              f"{row['hf_tok_s']:.1f} tok/s", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="opt-125m")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--batch-sizes", default="1,32", help="comma-separated, e.g. 1,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                    help="torch.set_num_threads (default: every core; on a loaded shared CPU, 1 "
                         "can be several times faster because OpenMP threads wait on each other)")
    args = ap.parse_args()
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batch-sizes must be comma-separated integers like 1,32, got {args.batch_sizes!r}")
    if not batches or min(batches) < 1 or args.new_tokens < 1 or args.prompt_len < 1 or args.reps < 1:
        ap.error("--batch-sizes, --new-tokens, --prompt-len and --reps must all be >= 1")

    if args.torch_threads < 1:
        ap.error(f"--torch-threads must be >= 1, got {args.torch_threads}")
    torch.set_num_threads(args.torch_threads)
    results = run(args.preset, PRESETS[args.preset], args.dtype, batches, args.new_tokens,
                  args.prompt_len, args.reps)
    results["torch_threads"] = args.torch_threads

    print(f"\n{args.new_tokens} new tokens after a {args.prompt_len}-token prompt, greedy, "
          f"median of {args.reps}, on {results['device']} ({os.cpu_count()} CPU cores visible, "
          f"torch threads {args.torch_threads})\n")
    print("| model | dtype | batch | ours tokens/s | transformers tokens/s | ratio (ours/theirs) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results["rows"]:
        print(f"| {args.preset} | {args.dtype} | {r['batch']} | {r['ours_tok_s']:,.1f} | "
              f"{r['hf_tok_s']:,.1f} | {r['ratio']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
