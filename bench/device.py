"""Every accelerator benchmark of this project, in one run on one GPU (about 8 minutes).

On the device machine, from the repository root (the package need not be installed):

    python bench/device.py --out $OUT/device.json

The project's configs and methods need ml_collections, which the lent H200 image lacks (it has
jax, flax, optax, orbax, einops, pillow, absl, transformers and torch) and cannot download; the
train sections fail without it (the others run). Vendor it once beside the checkout and carry it:

    pip install --no-deps --target .device_site ml_collections
    echo /.device_site/ >> .git/info/exclude
    # device run, carry=[".device_site"]:
    PYTHONPATH=.device_site python3 bench/device.py --out $OUT/device.json

Smoke mode: the same code at tiny sizes on a CPU, in well under a minute (tests/bench runs it,
so this script cannot rot before a GPU comes):

    python bench/device.py --smoke --out /tmp/device_smoke.json --results ''

Sections, in this order, each guarded (a failure is recorded and the next section runs) and
skipped when the time budget (--budget-s, default 480 s) would not hold it; the JSON is rewritten
after every section, so a run cut short still leaves what it measured:

  sinkhorn      B = 16,384 x K = 50,272, 3 iterations, float32, epsilon 0.05, every
                implementation of bench/ops.py (lax log domain, fused Pallas/Triton, the obvious
                exp-domain loop, ott-jax where installed). Target: <= 5.5 ms.
  search        nearest word, bf16, N = 16,384 and 65,536 x K = 50,272 x D = 768 (bench/ops.py).
  train_vlap    VLAP's real train step (methods/vlap.py via train/trainer.py) at the paper's
                sizes with random weights: CLIP ViT-B/32 + OPT-1.3B, batch 256, frozen models
                in bfloat16. Target: MFU >= 40%.
  train_lqae    LQAE's: ViT-B/16 encoder and decoder + RoBERTa-base at 256 px, batch 128 on one
                GPU (the paper's 512 is over many), bfloat16. Target: MFU >= 40%.
  generate_opt  OPT-1.3B greedy, 32 new tokens after 40, batch 1 and 32, bfloat16, ours beside
                transformers' PyTorch on the GPU (bench/generate.py). Target: ours >= 500
                tokens/s at batch 1 and >= 8,000 at batch 32.
  generate_t5   Flan-T5-base, the same.

A train step whose batch runs out of memory is retried at half the batch (recorded).

MFU = FLOPs per step / step time / the device's peak dense bf16 FLOP/s. FLOPs per step: XLA's
cost analysis of the lowered train step (bench/random_step.py; every dot 2 M N K, loop bodies
counted once and LQAE's chunked search counted through a single-chunk program, as plan mode
does). The frozen models get no weight gradient in these steps, so they count as forward +
backward through their activations (about 2x their forward), the trainable parts as forward +
both backward products. Peaks (NVIDIA datasheets, dense, no sparsity): H100 SXM and H200 989
TFLOP/s bf16 (HBM 3.35 and 4.8 TB/s), H100 PCIe 756 (2.0 TB/s), A100 312 (2.04 TB/s, 80 GB
SXM); other devices need --peak-tflops and --bandwidth-tbs. In smoke mode the peaks are nominal
placeholders and no figure means anything except that the code ran.

Writes one JSON (--out; default $OUT/device.json when $OUT is set, else ./device.json), the
Markdown table next to it (same name, .md), and appends the dated table, naming the device, to
bench/RESULTS.md (--results; '' = do not).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

# Leave room on the GPU for transformers' PyTorch beside JAX (the generation sections).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.70")

import jax  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import ops  # noqa: E402

# device_kind substring -> (dense bf16 FLOP/s, memory bytes/s); first match wins.
PEAKS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100", 312e12, 2.039e12),
]
SMOKE_PEAKS = (1e11, 1e10)  # placeholders for a CPU: smoke figures are not measurements

TARGETS = {"sinkhorn_ms": 5.5, "mfu": 0.40, "opt_tok_s_b1": 500.0, "opt_tok_s_b32": 8000.0}

# Rough seconds each section needs on an H100-class GPU (compiles included), for the budget.
ESTIMATE_S = {"sinkhorn": 30, "search": 30, "train_vlap": 90, "train_lqae": 90,
              "generate_opt": 100, "generate_t5": 60}

TINY_OPT = dict(model_type="opt", vocab_size=512, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, ffn_dim=64, max_position_embeddings=128,
                word_embed_proj_dim=32, activation_function="relu", do_layer_norm_before=True,
                enable_bias=True, tie_word_embeddings=True, pad_token_id=1, bos_token_id=2,
                eos_token_id=2)
TINY_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                 num_hidden_layers=1, num_attention_heads=2, patch_size=8, image_size=32,
                 num_channels=3, projection_dim=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TINY_T5 = dict(vocab_size=512, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False,
               decoder_start_token_id=0)


def peaks_for(device_kind: str, smoke: bool, peak_tflops: float,
              bandwidth_tbs: float) -> tuple[float | None, float | None, str]:
    """(bf16 FLOP/s, bytes/s, where they came from) for the device."""
    if peak_tflops or bandwidth_tbs:
        return (peak_tflops * 1e12 or None, bandwidth_tbs * 1e12 or None, "command line")
    if smoke:
        return SMOKE_PEAKS[0], SMOKE_PEAKS[1], "smoke placeholders"
    for key, flops, bandwidth in PEAKS:
        if key.lower() in device_kind.lower():
            return flops, bandwidth, f"datasheet ({key})"
    return None, None, "unknown device: pass --peak-tflops and --bandwidth-tbs"


# ----------------------------------------------------------------------------------------------
# Sections: each takes the run's context and returns a JSON-able dict.

def sinkhorn(ctx: dict[str, Any]) -> dict[str, Any]:
    b, k = (64, 512) if ctx["smoke"] else (16384, 50272)
    rows = ops.sinkhorn_rows([b], k, 0.05, ctx["bandwidth"] or 1e12, ctx["reps"],
                             fused_on_cpu=False)
    return {"rows": rows}


def search(ctx: dict[str, Any]) -> dict[str, Any]:
    sizes, dims, vocab = ([64], [32], 512) if ctx["smoke"] else ([16384, 65536], [768], 50272)
    return {"rows": ops.search_rows(sizes, dims, vocab, ctx["peak"] or 1e12, ctx["reps"])}


def _is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


def _train(ctx: dict[str, Any], config, build, vocab: int) -> dict[str, Any]:
    """Times the method's train step, halving the batch on out-of-memory (at most twice)."""
    from bench import random_step  # noqa: PLC0415  (needs ml_collections; see the top)

    tried = []
    for _ in range(3):
        try:
            p = random_step.prepare(config, build, vocab_hint=vocab)
            break
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e) or config.data.batch_size < 2:
                raise
            tried.append(config.data.batch_size)
            config.data.batch_size //= 2
            print(f"  out of memory at batch {tried[-1]}; retrying at {config.data.batch_size}",
                  flush=True)
    else:
        raise RuntimeError(f"out of memory at every batch tried: {tried}")
    times = p.run(ctx["train_reps"])
    step_s = sorted(times)[len(times) // 2]
    out = dict(batch=config.data.batch_size, oom_batches=tried, step_s=step_s, times=times,
               flops=p.flops, flops_as_configured=p.flops_as_configured,
               flops_compiled=p.flops_compiled, tflop_per_s=p.flops / step_s / 1e12,
               mfu=p.flops / step_s / ctx["peak"] if ctx["peak"] else None,
               temp_gib=p.temp_bytes / 2 ** 30, argument_gib=p.argument_bytes / 2 ** 30,
               compile_s=p.compile_s, loss=p.metrics.get("loss"), describe=p.describe)
    del p
    return out


def train_vlap(ctx: dict[str, Any]) -> dict[str, Any]:
    from bench import random_step  # noqa: PLC0415
    from lqae_vlap.methods import vlap  # noqa: PLC0415

    if ctx["smoke"]:
        c = random_step.load_config("vlap_opt", "opt-125m")
        c.model.llm_arch = dict(TINY_OPT)
        c.model.vision.arch = dict(TINY_CLIP)
        c.model.max_caption_len = 8
        c.data.batch_size, vocab = 4, TINY_OPT["vocab_size"]
    else:
        c = random_step.load_config("vlap_opt", "opt-1.3b")
        c.data.batch_size, vocab = 256, 50272
    # Paths that are not local folders: the abstract build uses the configs' architectures.
    c.model.llm_path = "bench-random/opt"
    c.model.vision.path = "bench-random/clip"
    c.model.llm_dtype = c.model.vision.dtype = ctx["dtype"]
    label = "VLAP, tiny CLIP + tiny OPT" if ctx["smoke"] else "VLAP, CLIP ViT-B/32 + OPT-1.3B"
    return dict(_train(ctx, c, vlap.build, vocab), label=label)


def train_lqae(ctx: dict[str, Any]) -> dict[str, Any]:
    from bench import random_step  # noqa: PLC0415
    from lqae_vlap.methods import lqae  # noqa: PLC0415

    if ctx["smoke"]:
        c = random_step.load_config("lqae_roberta", "16")
        vit = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
        c.model.update(dict(patch_size=8, encoder=vit, decoder=dict(vit)))
        c.quantizer.chunk_size = 128  # several chunks, so the FLOP count's override matters
        c.data.batch_size, lm = 4, random_step.roberta_fields(512, 32, 1, 2, 64)
    else:
        c = random_step.load_config("lqae_roberta", "256")
        c.data.batch_size, lm = 128, random_step.roberta_fields(50265, 768, 12, 12, 3072)
    c.model.lm_path = random_step.write_hf_config(tempfile.mkdtemp(prefix="bench_roberta_"), lm)
    c.model.dtype = c.model.lm_dtype = ctx["dtype"]
    label = ("LQAE, tiny ViT + tiny RoBERTa, 16 px" if ctx["smoke"]
             else "LQAE, ViT-B/16 + RoBERTa-base, 256 px")
    return dict(_train(ctx, c, lqae.build, lm["vocab_size"]), label=label)


def _generate(ctx: dict[str, Any], name: str) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from bench import generate  # noqa: PLC0415

    if ctx["smoke"]:
        preset = ("opt", {k: v for k, v in TINY_OPT.items() if k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads",
            "max_position_embeddings", "word_embed_proj_dim")}) if name == "opt-1.3b" \
            else ("t5", dict(TINY_T5))
        batches, new, prompt, dtype = [2], 4, 5, "float32"
        label = f"tiny {preset[0]}"
    else:
        preset, batches, new, prompt, dtype = generate.PRESETS[name], [1, 32], 32, 40, "bfloat16"
        label = name
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return generate.run(label, preset, dtype, batches, new, prompt, ctx["gen_reps"],
                        torch_device=device, sanity_float32=dtype == "float32")


SECTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sinkhorn": sinkhorn,
    "search": search,
    "train_vlap": train_vlap,
    "train_lqae": train_lqae,
    "generate_opt": lambda ctx: _generate(ctx, "opt-1.3b"),
    "generate_t5": lambda ctx: _generate(ctx, "flan-t5-base"),
}


# ----------------------------------------------------------------------------------------------
# Report

def _num(x: Any, spec: str, unit: str = "") -> str:
    if isinstance(x, (int, float)) and math.isfinite(x):
        return format(x, spec) + unit
    return str(x)


def _met(value: Any, target: float, lower_is_better: bool) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return "yes" if (value <= target if lower_is_better else value >= target) else "NO"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, figure, target, met) for the Markdown table."""
    rows: list[tuple[str, str, str, str]] = []
    s = report["sections"]
    for name, sec in s.items():
        if sec["status"] != "ok":
            rows.append((name, f"{sec['status']}: {sec.get('error', '')}"[:200], "", ""))
    if s.get("sinkhorn", {}).get("status") == "ok":
        for r in s["sinkhorn"]["result"]["rows"]:
            size = f"B {r['B']:,} x K {r['K']:,}"
            for impl in ("ours", "fused", "obvious", "ott"):
                v = r.get(f"{impl}_ms")
                label = {"ours": "lax", "fused": "fused Pallas"}.get(impl, impl)
                ours = impl in ("ours", "fused")
                rows.append((f"Sinkhorn {label}, {size}, 3 it, f32", f"{_num(v, '.2f', ' ms')} "
                             f"(floor {r['floor_ms']:.2f} ms)",
                             f"<= {TARGETS['sinkhorn_ms']} ms" if ours else "",
                             _met(v, TARGETS["sinkhorn_ms"], True) if ours else ""))
    if s.get("search", {}).get("status") == "ok":
        for r in s["search"]["result"]["rows"]:
            rows.append((f"nearest word N {r['N']:,} x K {r['K']:,} x D {r['D']}, bf16",
                         f"ours {_num(r['ours_ms'], '.2f', ' ms')}, full matrix "
                         f"{_num(r['obvious_ms'], '.2f', ' ms')} (matmul floor {r['floor_ms']:.2f} "
                         f"ms); temp MiB {_num(r['ours_temp_MiB'], '.0f')} / "
                         f"{_num(r['obvious_temp_MiB'], '.0f')}", "", ""))
    for name in ("train_vlap", "train_lqae"):
        if s.get(name, {}).get("status") == "ok":
            r = s[name]["result"]
            label = f"{r['label']} train step"
            oom = f"; out of memory at batch {r['oom_batches']}" if r["oom_batches"] else ""
            rows.append((f"{label}, batch {r['batch']}{oom}",
                         f"{r['step_s'] * 1e3:.1f} ms/step, {r['flops'] / 1e12:.2f} TFLOP/step, "
                         f"{r['tflop_per_s']:.1f} TFLOP/s, MFU {_num(r['mfu'], '.1%')}; "
                         f"temp {r['temp_gib']:.2f} GiB",
                         f"MFU >= {TARGETS['mfu']:.0%}", _met(r["mfu"], TARGETS["mfu"], False)))
    for name in ("generate_opt", "generate_t5"):
        if s.get(name, {}).get("status") == "ok":
            res = s[name]["result"]
            for r in res["rows"]:
                target = {1: TARGETS["opt_tok_s_b1"], 32: TARGETS["opt_tok_s_b32"]}.get(
                    r["batch"]) if name == "generate_opt" and not report["smoke"] else None
                rows.append((f"{res['preset']} greedy, batch {r['batch']}, {res['dtype']}, "
                             f"{res['new_tokens']} new tokens",
                             f"ours {r['ours_tok_s']:,.0f} tok/s, transformers "
                             f"({res['torch_device']}) {r['hf_tok_s']:,.0f} tok/s",
                             f">= {target:,.0f} tok/s" if target else "",
                             _met(r["ours_tok_s"], target, False) if target else ""))
            san = res.get("sanity", {})
            rows.append((f"{res['preset']} sanity ({res.get('sanity_dtype')})",
                         f"{san.get('rows_all_equal')}/{san.get('rows')} rows agree on the first "
                         f"{san.get('tokens_compared')} tokens", "", ""))
    return rows


def markdown(report: dict[str, Any], command: str) -> str:
    smoke = " [SMOKE: tiny sizes, not measurements]" if report["smoke"] else ""
    lines = [f"### Device benchmarks (bench/device.py), {report['started']}, "
             f"{report['device_kind']}{smoke}",
             "",
             f"Command: `{command}`. jax {report['jax']}, {report['device_count']} x "
             f"{report['device_kind']} ({report['platform']}); peaks {report['peaks_from']}: "
             f"bf16 {_num((report['peak'] or 0) / 1e12, '.0f')} TFLOP/s, memory "
             f"{_num((report['bandwidth'] or 0) / 1e12, '.2f')} TB/s; compute dtype "
             f"{report['dtype']}; total {report['elapsed_s']:.0f} s.",
             "",
             "| benchmark | figure | target | met |",
             "|---|---|---|---|"]
    # Smoke figures are not measurements: no target is judged on them.
    lines += [f"| {a} | {b} | {'' if report['smoke'] else c} | {'' if report['smoke'] else d} |"
              for a, b, c, d in summary_rows(report)]
    return "\n".join(lines)


def _write_json(path: str, report: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU (the test)")
    default_out = os.path.join(os.environ.get("OUT", "."), "device.json")
    ap.add_argument("--out", default=default_out, help="the JSON (default $OUT/device.json)")
    ap.add_argument("--results", default=os.path.join(REPO, "bench", "RESULTS.md"),
                    help="append the dated table here ('' = do not)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {list(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="skip a section that its estimate says would end past this")
    ap.add_argument("--reps", type=int, default=0, help="timed calls per kernel (0: 10, smoke 1)")
    ap.add_argument("--train-reps", type=int, default=0, help="timed train steps (0: 10, smoke 2)")
    ap.add_argument("--dtype", default="bfloat16", help="the frozen models' / ViTs' dtype")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--bandwidth-tbs", type=float, default=0.0)
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(SECTIONS)
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        print(f"error: --only names {bad}, not sections; use some of {list(SECTIONS)}",
              file=sys.stderr)
        return 2
    device = jax.devices()[0]
    if device.platform == "cpu" and not args.smoke:
        print("error: no accelerator (jax.devices() is the CPU); on a CPU run --smoke",
              file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    peak, bandwidth, peaks_from = peaks_for(device.device_kind, args.smoke, args.peak_tflops,
                                            args.bandwidth_tbs)
    ctx = dict(smoke=args.smoke, peak=peak, bandwidth=bandwidth,
               reps=args.reps or (1 if args.smoke else 10),
               train_reps=args.train_reps or (2 if args.smoke else 10),
               gen_reps=1 if args.smoke else 3,  # calls per generation row (the anchor's 3)
               dtype="float32" if args.smoke else args.dtype)
    report: dict[str, Any] = dict(
        started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device_kind=device.device_kind, platform=device.platform,
        device_count=jax.device_count(), jax=jax.__version__, smoke=args.smoke, peak=peak,
        bandwidth=bandwidth, peaks_from=peaks_from, dtype=ctx["dtype"], targets=TARGETS,
        sections={}, elapsed_s=0.0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for name in names:
        elapsed = time.perf_counter() - t0
        if not args.smoke and elapsed + ESTIMATE_S[name] > args.budget_s:
            report["sections"][name] = dict(status="skipped", error=(
                f"time budget: {elapsed:.0f} s spent, ~{ESTIMATE_S[name]} s needed, budget "
                f"{args.budget_s:.0f} s"))
            continue
        print(f"== {name} ({elapsed:.0f} s in)", flush=True)
        t, cpu = time.perf_counter(), time.process_time()
        try:
            report["sections"][name] = dict(status="ok", result=SECTIONS[name](ctx))
        except Exception as e:  # noqa: BLE001 - one section's failure must not end the run
            traceback.print_exc()
            hint = (" (a package the device image lacks: see the top of bench/device.py)"
                    if isinstance(e, ImportError) else "")
            report["sections"][name] = dict(status="failed",
                                            error=f"{type(e).__name__}: {str(e)[:300]}{hint}")
        report["sections"][name]["seconds"] = time.perf_counter() - t
        report["sections"][name]["cpu_s"] = time.process_time() - cpu  # all threads
        report["elapsed_s"] = time.perf_counter() - t0
        _write_json(args.out, report)

    report["elapsed_s"] = time.perf_counter() - t0
    _write_json(args.out, report)
    command = "python bench/device.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(report, command)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text + "\n")
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
