"""Our batch loader (data/batches.py IndexedBatches) against grain on an ImageNet-style JPEG pipeline.

    python bench/loader.py                      # 320 JPEGs, batch 32, 2 workers, 12 timed batches
    python bench/loader.py --images 640 --workers 4 --batches 20 --out loader.json
    python bench/loader.py --pipeline digits --batch 64 --kinds ours,ours-grain   # the demos' data

Pipeline (the LQAE training input, data/imagenet.py imagenet_preprocess): JPEG bytes -> decode
(PIL) -> RandomResizedCrop(256, scale (0.2, 1), bicubic) -> horizontal flip, batch 32, uint8.
The JPEGs are random 300-500 px crops of scikit-image's sample photographs (no download), held
in memory as bytes, as a tfds array_record source returns them.

--pipeline digits: the demos' data instead (data/captions.py DigitCaptions, 16 px uint8 digits held
in memory, LQAE's image-only preprocess): is starting worker processes worth it at tiny sizes?

Loaders, each with the same number of workers (--workers) and the same per-example function:
  ours        IndexedBatches(num_workers=W threads, prefetch=2): batch s = f(seed, s)
  ours-grain  IndexedBatches(worker_processes=W, num_workers=0, prefetch=2): its own batch_at(s)
              in W grain worker processes (data/batches.py), byte-identical to ``ours``
  grain-map   grain.MapDataset .shuffle .repeat .random_map .batch, read by index ds[s]
              (batch s = f(seed, s) too), no parallelism: the single-thread baseline
  grain-thr   the same per-example dataset .to_iter_dataset(ReadOptions(num_threads=W)).batch
  grain-mp    ... .to_iter_dataset().batch().mp_prefetch(num_workers=W processes), as MaxText

Reported: images/s over --batches batches after 2 warm-up batches (best of --reps passes), the
median and range over --rounds interleaved rounds; the median seconds to the first batch (what
starting threads or processes costs a run);
determinism (two fresh loaders give byte-identical batches); resume: ours and grain-map by
construction (ask for batch s), ours-grain by starting its iterator at step k (what the trainer
does on resume), grain-thr / grain-mp by their checkpointable iterator state
(``get_state`` after k batches, ``set_state`` on a fresh iterator, next batch == batch k); and
whether ours-grain's first batches are byte-identical to ours'.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lqae_vlap.data import batches as batches_lib  # noqa: E402
from lqae_vlap.data.imagenet import imagenet_preprocess  # noqa: E402

SIZE = 256


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n JPEG files (quality 90) of random 300-500 px crops of scikit-image's sample photos."""
    from skimage import data  # noqa: PLC0415  (test extra; sample photos ship with it)

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h = int(rng.integers(300, min(500, photo.shape[0]) + 1))
        w = int(rng.integers(300, min(500, photo.shape[1]) + 1))
        top = int(rng.integers(0, photo.shape[0] - h + 1))
        left = int(rng.integers(0, photo.shape[1] - w + 1))
        buffer = io.BytesIO()
        Image.fromarray(photo[top:top + h, left:left + w]).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class JpegSource:
    """Random access to encoded images: source[i] -> {'image': JPEG bytes, 'label': int32}."""

    def __init__(self, jpegs: list[bytes]):
        self.jpegs = jpegs

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.jpegs[int(i)], "label": np.int32(int(i) % 10)}


PREPROCESS = imagenet_preprocess(SIZE, train=True)


def augment(example: dict, rng: np.random.Generator) -> dict:
    """The per-example function both loaders run (picklable for grain's worker processes)."""
    return PREPROCESS(example, rng)


def image_only(example: dict, rng: np.random.Generator) -> dict:
    """The demos' per-example function (methods/lqae.py's, with no augmentation)."""
    del rng
    return {"image": example["image"]}


PIPELINES = {"jpeg": augment, "digits": image_only}
pipeline_fn = augment  # set by main() from --pipeline


def ours(source, batch: int, workers: int, seed: int = 0, processes: bool = False):
    return batches_lib.IndexedBatches(
        source, global_batch_size=batch, seed=seed, shuffle=True, preprocess=pipeline_fn,
        num_workers=0 if processes else workers, worker_processes=workers if processes else 0,
        prefetch=2)


def grain_map(source, batch: int, seed: int = 0):
    import grain  # noqa: PLC0415

    return (grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
            .random_map(pipeline_fn).batch(batch, drop_remainder=True))


def grain_iter(source, batch: int, workers: int, processes: bool, seed: int = 0):
    """The pipeline as MaxText builds it: per-example map dataset -> to_iter_dataset (read
    threads work on examples) -> batch -> optionally mp_prefetch (worker processes)."""
    import grain  # noqa: PLC0415

    examples = (grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
                .random_map(pipeline_fn))
    if processes:
        ds = examples.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=batch))
        return ds.batch(batch, drop_remainder=True).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    ds = examples.to_iter_dataset(grain.ReadOptions(num_threads=workers,
                                                    prefetch_buffer_size=2 * batch))
    return ds.batch(batch, drop_remainder=True)


def iterate(kind: str, source, batch: int, workers: int):
    """A fresh iterator of (batch dict) for loader ``kind``, and a close function."""
    if kind in ("ours", "ours-grain"):
        loader = ours(source, batch, workers, processes=kind == "ours-grain")
        gen = (b for _, b in loader.iterate(0))
        return gen, lambda: (gen.close(), loader.close())
    if kind == "grain-map":
        ds = grain_map(source, batch)
        gen = (ds[s] for s in range(10**9))
        return gen, lambda: None
    it = iter(grain_iter(source, batch, workers, processes=kind == "grain-mp"))
    return it, getattr(it, "close", lambda: None)


def digest(b: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(b):
        h.update(np.ascontiguousarray(b[k]).tobytes())
    return h.hexdigest()[:16]


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its live worker processes (psutil) so far."""
    total = time.process_time()
    try:
        import psutil  # noqa: PLC0415
    except ImportError:
        return total
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(kind: str, source, batch: int, workers: int, batches: int, reps: int) -> dict:
    best, first, cpu_ms = 0.0, float("inf"), float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        it, close = iterate(kind, source, batch, workers)
        try:
            next(it)
            first = min(first, time.perf_counter() - t)
            for _ in range(1):  # warm-up: threads / processes started, first batches ready
                next(it)
            t, c = time.perf_counter(), cpu_seconds()
            for _ in range(batches):
                b = next(it)
            best = max(best, batches * batch / (time.perf_counter() - t))
            # Per image, all threads and processes: the cost, which load elsewhere barely moves
            # (images/s does: a loaded machine hands each runnable thread a share).
            cpu_ms = min(cpu_ms, 1e3 * (cpu_seconds() - c) / (batches * batch))
        finally:
            close()
    assert b["image"].shape[0] == batch and b["image"].dtype == np.uint8
    return {"images_per_s": best, "first_batch_s": first, "cpu_ms_per_image": cpu_ms}


def first_batches(kind: str, source, batch: int, workers: int, n: int) -> list[str]:
    it, close = iterate(kind, source, batch, workers)
    try:
        return [digest(next(it)) for _ in range(n)]
    finally:
        close()


def resumes(kind: str, source, batch: int, workers: int, k: int, reference: list[str]) -> bool:
    """Batch k after a restart equals batch k of an uninterrupted run."""
    if kind == "ours":
        loader = ours(source, batch, workers)
        try:
            return digest(loader.batch_at(k)) == reference[k]  # the step is the whole state
        finally:
            loader.close()
    if kind == "ours-grain":  # as the trainer resumes: a fresh loader's iterator from step k
        gen = ours(source, batch, workers, processes=True).iterate(k, k + 1)
        try:
            return digest(next(gen)[1]) == reference[k]
        finally:
            gen.close()
    if kind == "grain-map":
        return digest(grain_map(source, batch)[k]) == reference[k]
    ds = grain_iter(source, batch, workers, processes=kind == "grain-mp")
    it = iter(ds)
    for _ in range(k):
        next(it)
    state = it.get_state()  # what one would save with orbax beside the train state
    getattr(it, "close", lambda: None)()
    fresh = iter(ds)
    fresh.set_state(state)
    try:
        return digest(next(fresh)) == reference[k]
    finally:
        getattr(fresh, "close", lambda: None)()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kinds", default="ours,ours-grain,grain-map,grain-thr,grain-mp")
    p.add_argument("--pipeline", default="jpeg", choices=sorted(PIPELINES))
    p.add_argument("--out", default="")
    a = p.parse_args()
    import grain  # noqa: PLC0415
    from absl import flags  # noqa: PLC0415

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (their defaults)

    global pipeline_fn
    pipeline_fn = PIPELINES[a.pipeline]
    if a.pipeline == "digits":
        from lqae_vlap.data.captions import DigitCaptions  # noqa: PLC0415

        source = DigitCaptions("train", image_size=16)
        what = f"{len(source)} digits (16 px, in memory)"
    else:
        source = JpegSource(make_jpegs(a.images))
        what = f"{a.images} JPEGs (mean {np.mean([len(j) for j in source.jpegs]) / 1024:.0f} KiB)"
    print(f"{what}, batch {a.batch}, {a.workers} workers, "
          f"{a.batches} timed batches, best of {a.reps}, {a.rounds} rounds; grain {grain.__version__ if hasattr(grain, '__version__') else '?'}"
          f", {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    kinds = a.kinds.split(",")
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    firsts: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(a.rounds):  # interleaved, so a burst of load elsewhere hits every loader
        for kind in kinds:
            m = measure(kind, source, a.batch, a.workers, a.batches, a.reps)
            rates[kind].append(m["images_per_s"])
            firsts[kind].append(m["first_batch_s"])
            cpus[kind].append(m["cpu_ms_per_image"])
    print("| loader | images/s median (min-max over rounds) | CPU ms/image | first batch s | "
          "deterministic | exact resume |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for kind in kinds:
        once, twice = (first_batches(kind, source, a.batch, a.workers, 4) for _ in range(2))
        r = {"images_per_s": rates[kind], "median": float(np.median(rates[kind])),
             "first_batch_s": firsts[kind], "cpu_ms_per_image": cpus[kind],
             "deterministic": once == twice,
             "resume": resumes(kind, source, a.batch, a.workers, 3, once), "first4": once}
        rows[kind] = r
        print(f"| {kind} | {r['median']:.0f} ({min(rates[kind]):.0f}-{max(rates[kind]):.0f}) | "
              f"{np.median(cpus[kind]):.2f} | {np.median(firsts[kind]):.2f} | "
              f"{r['deterministic']} | {r['resume']} |",
              flush=True)
    if "ours" in rows and "ours-grain" in rows:
        print(f"ours-grain's first 4 batches byte-identical to ours': "
              f"{rows['ours']['first4'] == rows['ours-grain']['first4']}")
    # Same order and augmentation? (grain draws its own permutation and per-element seeds.)
    same = first_batches("ours", source, a.batch, a.workers, 1) == first_batches(
        "grain-map", source, a.batch, a.workers, 1)
    print(f"ours and grain give the same batch 0: {same}; load after: {os.getloadavg()[0]:.1f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
