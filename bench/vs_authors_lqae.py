"""LQAE train step, side by side: this project's against the authors' released code.

    python bench/vs_authors_lqae.py --authors=/path/to/language-quantized-autoencoders \
        --authors-site=/path/to/site

Both sides build the SAME matched configuration with random weights and no download: ViT
encoder and decoder WIDTH x DEPTH (heads WIDTH/64, MLP 4 x WIDTH), patch PATCH on IMAGE px, a
RoBERTa-shaped masked LM of the same width and depth with VOCAB words as the frozen codebook,
batch BATCH, float32, the released run's loss settings (mask ratio 0.5, commitment 0.005,
masked-LM weight 1e-4, both reconstructions weight 1.0, l2-normalised search). Defaults: 256 x 4,
patch 8 on 64 px, 50,265 words, batch 32.

Each side runs in its own worker process (the authors' code needs transformers 4.x, whose Flax
classes transformers 5 removed; this project needs transformers 5), jits its train step once,
runs one warm-up step, and reports XLA's compiled temporary memory and FLOPs. Then the harness
times them in interleaved rounds (each round runs every side for --steps steps, the order
rotating each round), so that a change in the machine's load hits every side alike; it reports
the median step time per side and the ratio, prints a Markdown table and appends it, dated,
with the machine, jax version and load average, to bench/RESULTS.md (--results '' to skip).

Our side is the project's own LQAE train step (methods/lqae.py through train/trainer.py's
make_train_step) from configs/lqae_roberta.py with the sizes overridden. --ours-block=released
also times our config with the released ViT block, when this checkout's config has the key
(--block-key, --block-value); otherwise the row is reported as unavailable.

Their side: the harness puts --authors (and --authors-site, os.pathsep-separated folders with
what their code needs that this environment lacks) first on the worker's sys.path, imports
their ``lqae.models.lqae.LQAE`` unchanged, and at run time replaces the two Hugging Face
downloads it makes (``FlaxRobertaForMaskedLM.from_pretrained`` and
``RobertaTokenizer.from_pretrained``) with a random FlaxRobertaForMaskedLM of the matched shape
and a stand-in tokenizer whose <mask> is the last word. Their train step lives inside
``lqae/main/lqae_main.py:main`` (with data loaders and wandb), so the worker writes the same
step out: ``model.apply(params, image, train=True, rngs=...)``, loss = image losses +
quantizer loss + masked-LM loss, ``jax.value_and_grad`` over ALL params (their frozen RoBERTa
included, as theirs), gradient norm, ``TrainState.apply_gradients`` with their
``optax.multi_transform`` (set_to_zero for lang_model; clip + AdamW(0.9, 0.95) for the rest),
jitted on one device instead of pmapped (a pmap over one device adds only its collectives).

Their code needs: flax, optax, ml_collections, einops, requests, PIL (all in this project's
environment) and dill plus transformers 4.x with its Flax RoBERTa. Install those aside, not
into the environment:

    pip install --no-deps --target SITE transformers==4.57.6 huggingface_hub==0.36.0 \
        tokenizers==0.22.1 dill
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL = "@@bench "  # worker lines that carry results start with this (the rest is logging)


# ----------------------------------------------------------------------------------------------
# Workers (each in its own process)

def _send(msg: dict[str, Any]) -> None:
    sys.stdout.write(PROTOCOL + json.dumps(msg) + "\n")
    sys.stdout.flush()


def _serve(run, info: dict[str, Any]) -> None:
    """Reports ``info``, then times ``run(n)`` for each 'run N' line until 'quit'."""
    _send(info)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            return
        _send({"times": run(int(cmd[1]))})


def ours_worker(sizes: dict[str, Any], block: str, block_key: str, block_value: str,
                remat: str = "config") -> None:
    sys.path.insert(0, REPO)
    from bench import random_step  # noqa: PLC0415
    from lqae_vlap.methods import lqae  # noqa: PLC0415

    w, d, v = sizes["width"], sizes["depth"], sizes["vocab"]
    c = random_step.load_config("lqae_roberta", str(sizes["image"]))
    section, _, key = block_key.rpartition(".")
    holder = c[section] if section else c
    if block == "released" and key not in holder:
        _send({"unavailable": f"configs/lqae_roberta.py has no {block_key} on this checkout "
                              "(the released ViT block is not merged here)"})
        return
    if key in holder:  # the paper config's default is the released block: name both explicitly
        holder[key] = block_value if block == "released" else "plain"
    # Their step as the harness runs it weights both reconstructions 1.0 (theirs computes both
    # whatever the weights); ours skips the decoder on q at weight 0, so match the work here.
    c.loss.recon_quantized = 1.0
    if remat != "config":
        c.model.remat = remat == "on"
    vit = dict(width=w, depth=d, num_heads=w // 64 or 1, mlp_dim=4 * w)
    c.model.update(dict(patch_size=sizes["patch"], encoder=vit, decoder=dict(vit)))
    c.data.batch_size = sizes["batch"]
    c.train.steps = 1000
    c.optim.warmup_steps = 10
    folder = tempfile.mkdtemp(prefix="bench_roberta_")
    c.model.lm_path = random_step.write_hf_config(
        folder, random_step.roberta_fields(v, w, d, w // 64 or 1, 4 * w))
    p = random_step.prepare(c, lqae.build, vocab_hint=v)
    # Their stand-in tokenizer's <mask> is the last word; ours uses the same id.
    import jax  # noqa: PLC0415

    p.frozen["mask_token_id"] = jax.device_put(jax.numpy.int32(v - 1),
                                               p.frozen["mask_token_id"].sharding)

    _serve(p.run, dict(side=f"ours ({block} ViT block, remat {c.model.remat})", loss=p.metrics["loss"],
                       temp_bytes=p.temp_bytes,
                       argument_bytes=p.argument_bytes, flops=p.flops,
                       flops_compiled=p.flops_compiled, compile_s=p.compile_s,
                       jax=jax.__version__, describe=p.describe))


def theirs_worker(sizes: dict[str, Any], authors: str, site: list[str]) -> None:
    sys.path[:0] = [authors, *site]
    os.environ.setdefault("USE_TORCH", "0")  # transformers 4.x: Flax only, no torch import
    os.environ.setdefault("USE_TF", "0")
    try:
        import transformers  # noqa: PLC0415
        from transformers import FlaxRobertaForMaskedLM, RobertaConfig  # noqa: PLC0415
    except ImportError as e:
        _send({"error": f"the authors' code needs transformers 4.x with its Flax RoBERTa "
                        f"(transformers 5 removed Flax): {e}. Install it aside: pip install "
                        "--no-deps --target SITE transformers==4.57.6 huggingface_hub==0.36.0 "
                        "tokenizers==0.22.1 dill, then pass --authors-site=SITE"})
        return
    try:
        import lqae.models.lqae as their  # noqa: PLC0415
        from lqae.jax_utils import JaxRNG  # noqa: PLC0415
    except ImportError as e:
        _send({"error": f"cannot import the authors' lqae.models.lqae from {authors}: {e} "
                        "(--authors must be their checkout's root; missing packages go in "
                        "--authors-site)"})
        return
    import flax  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from flax.training.train_state import TrainState  # noqa: PLC0415
    from ml_collections import ConfigDict  # noqa: PLC0415

    w, d, v, b = sizes["width"], sizes["depth"], sizes["vocab"], sizes["batch"]
    heads = w // 64 or 1
    lm = FlaxRobertaForMaskedLM(RobertaConfig(
        vocab_size=v, hidden_size=w, num_hidden_layers=d, num_attention_heads=heads,
        intermediate_size=4 * w, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5), seed=0)

    class RandomPretrained:
        """Stands in for the hub download: the same random model for every call."""

        @staticmethod
        def from_pretrained(*_args, **_kw):
            return lm

    class StandInTokenizer:
        mask_token = "<mask>"

        @staticmethod
        def from_pretrained(*_args, **_kw):
            return StandInTokenizer()

        def convert_tokens_to_ids(self, token):
            assert token == self.mask_token, token
            return v - 1

    their.FlaxRobertaForMaskedLM = RandomPretrained
    their.RobertaTokenizer = StandInTokenizer

    # The released run's flags (their README), at the matched sizes; both reconstructions
    # weighted 1.0 as ours (the README's run weights the quantized one 0.0, which computes
    # the same and only drops its term).
    flags = dict(
        vit_encoder_decoder=True, vit_model_type=f"{d}/{heads}", patch_size=sizes["patch"],
        hidden_size=w, intermediate_size=4 * w, bert_min_ratio=0.5, bert_max_ratio=0.5,
        quantizer_loss_commitment=0.005, quantizer_loss_entropy=0.0,
        quantizer_loss_perplexity=0.0, l2_normalize=True, top_k_value=1, top_k_avg=False,
        top_k_rnd=False, use_bert_codebook=True, bert_mask_loss_weight=1e-4,
        bert_channel_image_loss_weight=1.0, nochannel_image_loss_weight=1.0,
        quantizer_latent_dim=0, strawman_codebook=False, use_bert_ste=False)
    model = their.LQAE(ConfigDict(flags))
    image = jnp.asarray(np.random.default_rng(0).uniform(
        -1, 1, (b, sizes["image"], sizes["image"], 3)).astype(np.float32))
    rng = JaxRNG(jax.random.PRNGKey(42))
    params = model.init(rng(keys=model.rng_keys()), image[:2], train=True)

    # lqae_main.py: AdamW(0.9, 0.95) behind a (1e9) global-norm clip on everything but the
    # frozen language model, which gets set_to_zero.
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-4, 10, 1000, 0.0)
    tx = optax.multi_transform(
        {True: optax.set_to_zero(),
         False: optax.chain(optax.clip_by_global_norm(1e9),
                            optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=5e-4))},
        lambda p: flax.traverse_util.unflatten_dict(
            {k: "lang_model" in k for k in flax.traverse_util.flatten_dict(p)}))
    state = TrainState.create(params=flax.core.unfreeze(params), apply_fn=None, tx=tx)

    def train_step(state, rng, image):
        rng_generator = JaxRNG(rng)

        def loss_fn(params):
            output, rd = model.apply(params, image, train=True,
                                     rngs=rng_generator(keys=model.rng_keys()))
            recon = (flags["bert_channel_image_loss_weight"]
                     * jnp.mean((image - output["bert_channel_image_output"]) ** 2)
                     + flags["nochannel_image_loss_weight"]
                     * jnp.mean((image - output["image_output"]) ** 2))
            total = recon + rd["quantizer_loss"] + rd["bert_loss"]
            aux = dict(recon_loss=recon, quantizer_loss=rd["quantizer_loss"],
                       bert_loss=rd["bert_loss"], total_loss=total,
                       perplexity=rd["perplexity"], codebook_usage=rd["codebook_usage"])
            return total, (aux, rd["encoding_indices"])

        (loss, (aux, indices)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        aux["grad_norm"] = optax.global_norm(grads)
        aux["learning_rate"] = schedule(state.step)
        return state.apply_gradients(grads=grads), aux, rng_generator(), indices

    step = jax.jit(train_step, donate_argnums=0)
    key = jax.random.PRNGKey(0)
    lowered = step.lower(state, key, image)
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    memory = compiled.memory_analysis()

    def flops(cost):
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float((cost or {}).get("flops", 0.0))
    box = {"state": state, "rng": key}

    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            box["state"], aux, box["rng"], indices = step(box["state"], box["rng"], image)
            jax.block_until_ready((box["state"], aux, indices))
            times.append(time.perf_counter() - t)
        box["loss"] = float(aux["total_loss"])
        return times

    run(1)  # warm-up
    _serve(run, dict(side="authors' released code", loss=box["loss"],
                     temp_bytes=int(memory.temp_size_in_bytes),
                     argument_bytes=int(memory.argument_size_in_bytes),
                     flops=flops(lowered.cost_analysis()),
                     flops_compiled=flops(compiled.cost_analysis()), compile_s=compile_s,
                     jax=jax.__version__, transformers=transformers.__version__))


# ----------------------------------------------------------------------------------------------
# The harness

class Worker:
    """One side in a subprocess, driven line by line."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=REPO)
        self.info: dict[str, Any] = {}
        self.times: list[float] = []

    def read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
            sys.stderr.write(f"[{self.name}] {line}")
        code = self.proc.wait()
        return {"error": f"the {self.name} worker exited with status {code} before answering "
                         "(its traceback is above)"}

    def start(self) -> dict[str, Any]:
        self.info = self.read()
        return self.info

    def run(self, n: int) -> list[float]:
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        msg = self.read()
        if "times" not in msg:
            raise RuntimeError(msg.get("error", str(msg)))
        self.times += msg["times"]
        return msg["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f}" if b >= 1e8 else f"{b / 1e9:.4f}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown model"


def table(rows: list[dict[str, Any]]) -> str:
    theirs = next((r for r in rows if r["name"] == "theirs" and r.get("median_s")), None)
    lines = ["| side | median step s | steps timed | theirs / this | temp GB (compiled) | "
             "argument GB | GFLOP per step | compile s | loss after warm-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r['label']} | {r['note']} | | | | | | | |")
            continue
        ratio = f"{theirs['median_s'] / r['median_s']:.2f}x" if theirs else "-"
        lines.append(f"| {r['label']} | {r['median_s']:.3f} | {r['steps']} | {ratio} | "
                     f"{_gb(r['temp_bytes'])} | {_gb(r['argument_bytes'])} | "
                     f"{r['flops'] / 1e9:,.1f} | {r['compile_s']:.0f} | {r['loss']:.4g} |")
    return "\n".join(lines)


def append_results(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write("\n" + text.rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--authors", default="", help="root of a checkout of the authors' LQAE code "
                    "(github.com/forhaoliu/language-quantized-autoencoders); '' = ours only")
    ap.add_argument("--authors-site", default="",
                    help="extra folders (os.pathsep-separated) for their worker's sys.path")
    ap.add_argument("--ours-block", choices=("plain", "released", "both"), default="both")
    ap.add_argument("--block-key", default="model.architecture",
                    help="the config key that selects the released ViT block")
    ap.add_argument("--block-value", default="released")
    ap.add_argument("--ours-remat", choices=("config", "on", "off", "both"), default="config",
                    help="our blocks' rematerialisation ('both': one row each, on and off): as "
                         "configs/lqae_roberta.py (on, as the "
                         "released code), or forced")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50265)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per side per round")
    ap.add_argument("--results", default=os.path.join(REPO, "bench", "RESULTS.md"),
                    help="append the dated table here ('' = do not)")
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = dict(width=args.width, depth=args.depth, image=args.image, patch=args.patch,
                 vocab=args.vocab, batch=args.batch)

    if args.worker == "ours":
        ours_worker(sizes, *json.loads(args.worker_args))
        return 0
    if args.worker == "theirs":
        theirs_worker(sizes, *json.loads(args.worker_args))
        return 0

    if args.authors and not os.path.isfile(os.path.join(args.authors, "lqae", "models",
                                                         "lqae.py")):
        print(f"error: --authors={args.authors} has no lqae/models/lqae.py; pass the root of a "
              "checkout of github.com/forhaoliu/language-quantized-autoencoders", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.steps < 1:
        print("error: --rounds and --steps must be >= 1", file=sys.stderr)
        return 2
    size_flags = [f"--{k}={v}" for k, v in sizes.items()]
    env = dict(os.environ)
    blocks = ["plain", "released"] if args.ours_block == "both" else [args.ours_block]
    remats = ["on", "off"] if args.ours_remat == "both" else [args.ours_remat]
    specs = [(f"ours-{b}" + (f"-remat-{r}" if len(remats) > 1 else ""), "ours",
              [b, args.block_key, args.block_value, r]) for b in blocks for r in remats]
    if args.authors:
        site = [s for s in args.authors_site.split(os.pathsep) if s]
        specs.append(("theirs", "theirs", [os.path.abspath(args.authors), site]))

    load_start = os.getloadavg()
    rows, workers = [], []
    try:
        # One worker at a time while compiling, so compiles do not compete with each other.
        for name, kind, wargs in specs:
            w = Worker(name, ["--worker", kind, "--worker-args", json.dumps(wargs), *size_flags],
                       env)
            info = w.start()
            print(f"[{name}] {info}", flush=True)
            if "temp_bytes" not in info:
                rows.append(dict(name=name, label=name, note=info.get("unavailable")
                                 or info.get("error", str(info))))
                w.close()
                continue
            workers.append(w)
        for r in range(args.rounds):
            order = workers[r % len(workers):] + workers[:r % len(workers)] if workers else []
            for w in order:
                times = w.run(args.steps)
                print(f"round {r + 1}: {w.name} {', '.join(f'{t:.3f}' for t in times)} s",
                      flush=True)
    finally:
        for w in workers:
            w.close()
    load_end = os.getloadavg()
    for w in workers:
        rows.append(dict(name=w.name, label=w.info["side"], median_s=statistics.median(w.times),
                         steps=len(w.times), times=w.times, **{k: w.info[k] for k in (
                             "temp_bytes", "argument_bytes", "flops", "flops_compiled",
                             "compile_s", "loss")}))
    rows.sort(key=lambda r: (r["name"] == "theirs", r["name"]))

    import jax  # noqa: PLC0415  (after the workers: the harness itself computes nothing)

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (f"{os.cpu_count()}-core {platform.machine()} CPU "
               f"({cpu_model()})"
               if jax.devices()[0].platform == "cpu" else jax.devices()[0].device_kind)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    their_info = next((w.info for w in workers if w.name == "theirs"), {})
    text = "\n".join([
        f"### LQAE train step vs the authors' code, {when}",
        "",
        f"Command: `python bench/vs_authors_lqae.py {command}`",
        f"Machine: {machine}; jax {jax.__version__}"
        + (f"; their side with transformers {their_info['transformers']} (Flax RoBERTa)"
           if their_info else "")
        + f". Load average (1/5/15 min) {' '.join(f'{x:.2f}' for x in load_start)} at the start, "
          f"{' '.join(f'{x:.2f}' for x in load_end)} at the end.",
        f"Matched: ViT {args.width} x {args.depth} encoder and decoder, patch {args.patch} on "
        f"{args.image} px, RoBERTa-shaped {args.width} x {args.depth} codebook model with "
        f"{args.vocab:,} words, batch {args.batch}, float32, random weights. {args.rounds} "
        f"interleaved rounds of {args.steps} steps per side (order rotating), after one "
        "warm-up step; median of the timed steps. Temp = XLA's compiled temporary memory "
        "(`memory_analysis().temp_size_in_bytes`); argument = parameters, optimizer state, "
        "frozen weights and batch passed in (their codebook and LM word table are compiled in "
        "as constants instead); GFLOP = XLA's cost analysis of the lowered step (ours: the "
        "chunked codebook search counted through a single-chunk program).",
        "",
        table(rows),
    ])
    print("\n" + text, flush=True)
    if args.results:
        append_results(args.results, text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(sizes=sizes, rows=rows, load_start=load_start, load_end=load_end,
                           jax=jax.__version__, machine=machine, when=when), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
