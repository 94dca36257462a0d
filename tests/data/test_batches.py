"""IndexedBatches: order from the documented formula, resumability, process slices, prefetching,
grain worker processes (the thread path's batches, byte for byte) and their fallback."""

from __future__ import annotations

import os
import pickle
import re
import signal
import threading

import numpy as np
import pytest

from lqae_vlap.data import images
from lqae_vlap.data.batches import IndexedBatches
from tests.helpers import load_config


class ArraySource:
    """n examples whose 'index' field records which source row they came from."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"index": np.int64(i), "x": np.full((2, 3), i, np.float32)}


def expected_indices(step: int, n: int, g: int, seed: int) -> np.ndarray:
    """The documented order, written out independently: position p -> perm_{p // n}[p % n]."""
    out = []
    for p in range(step * g, (step + 1) * g):
        perm = np.random.default_rng([seed, p // n]).permutation(n)
        out.append(perm[p % n])
    return np.array(out)


def draw_preprocess(example: dict, rng: np.random.Generator) -> dict:
    # Records the random draw so tests can see which stream each example got.
    return {**example, "draw": rng.integers(0, 2**62)}


def test_batch_at_matches_formula_and_is_deterministic():
    n, g, seed = 10, 4, 3
    batches = IndexedBatches(ArraySource(n), global_batch_size=g, seed=seed)
    for step in range(8):  # 32 positions: three full epochs and part of a fourth
        b = batches.batch_at(step)
        np.testing.assert_array_equal(b["index"], expected_indices(step, n, g, seed))
        assert b["x"].shape == (g, 2, 3) and b["x"].dtype == np.float32
        np.testing.assert_array_equal(b["x"][:, 0, 0], b["index"].astype(np.float32))
    # Same step twice, and a fresh object with the same seed (a restarted process): same batch.
    again = IndexedBatches(ArraySource(n), global_batch_size=g, seed=seed)
    for step in (7, 0, 5):
        np.testing.assert_array_equal(batches.batch_at(step)["index"], again.batch_at(step)["index"])
    other = IndexedBatches(ArraySource(n), global_batch_size=g, seed=seed + 1)
    assert any(
        not np.array_equal(batches.batch_at(s)["index"], other.batch_at(s)["index"]) for s in range(3)
    )


def test_each_epoch_is_a_permutation_and_epochs_differ():
    n, g = 12, 3
    batches = IndexedBatches(ArraySource(n), global_batch_size=g, seed=0)
    stream = np.concatenate([batches.batch_at(s)["index"] for s in range(3 * n // g)])
    epochs = stream.reshape(3, n)
    for e in range(3):
        np.testing.assert_array_equal(np.sort(epochs[e]), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])


def test_batches_straddle_epoch_boundaries_without_dropping():
    n, g, seed = 10, 4, 7
    batches = IndexedBatches(ArraySource(n), global_batch_size=g, seed=seed)
    # Step 2 holds positions 8..11: the last two of epoch 0 and the first two of epoch 1.
    got = batches.batch_at(2)["index"]
    perm0 = np.random.default_rng([seed, 0]).permutation(n)
    perm1 = np.random.default_rng([seed, 1]).permutation(n)
    np.testing.assert_array_equal(got, np.concatenate([perm0[8:10], perm1[0:2]]))
    # Five steps of 4 = two epochs of 10 exactly: each example seen exactly twice.
    seen = np.concatenate([batches.batch_at(s)["index"] for s in range(5)])
    np.testing.assert_array_equal(np.bincount(seen, minlength=n), np.full(n, 2))


def test_no_shuffle_reads_in_order():
    batches = IndexedBatches(ArraySource(5), global_batch_size=2, seed=0, shuffle=False)
    stream = np.concatenate([batches.batch_at(s)["index"] for s in range(5)])
    np.testing.assert_array_equal(stream, np.tile(np.arange(5), 2))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
    n, g, seed = 13, 8, 5
    single = IndexedBatches(ArraySource(n), global_batch_size=g, seed=seed, preprocess=draw_preprocess)
    parts = [
        IndexedBatches(
            ArraySource(n),
            global_batch_size=g,
            seed=seed,
            process_index=k,
            process_count=process_count,
            preprocess=draw_preprocess,
        )
        for k in range(process_count)
    ]
    for step in (0, 1, 4):  # step 1 straddles epochs 0 and 1 (positions 8..15, n = 13)
        whole = single.batch_at(step)
        local = [p.batch_at(step) for p in parts]
        assert all(b["index"].shape == (g // process_count,) for b in local)
        for key in ("index", "x", "draw"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), whole[key])


def test_preprocess_rng_is_a_function_of_seed_and_position():
    n, g, seed = 6, 3, 11
    plain = IndexedBatches(ArraySource(n), global_batch_size=g, seed=seed, preprocess=draw_preprocess)
    threaded = IndexedBatches(
        ArraySource(n), global_batch_size=g, seed=seed, preprocess=draw_preprocess, num_workers=3
    )
    with threaded:
        for step in range(4):
            np.testing.assert_array_equal(plain.batch_at(step)["draw"], threaded.batch_at(step)["draw"])
    draws = np.concatenate([plain.batch_at(s)["draw"] for s in range(4)])
    # Every position its own stream: the same example in two epochs gets two different crops.
    assert len(np.unique(draws)) == len(draws)
    reseeded = IndexedBatches(ArraySource(n), global_batch_size=g, seed=seed + 1, preprocess=draw_preprocess)
    assert not np.array_equal(reseeded.batch_at(0)["draw"], plain.batch_at(0)["draw"])


@pytest.mark.parametrize("num_workers,prefetch", [(0, 0), (0, 2), (2, 3)])
def test_iterate_equals_batch_at_and_resumes(num_workers, prefetch):
    n, g, seed = 9, 4, 2
    make = lambda: IndexedBatches(  # noqa: E731
        ArraySource(n),
        global_batch_size=g,
        seed=seed,
        preprocess=draw_preprocess,
        num_workers=num_workers,
        prefetch=prefetch,
    )
    reference = make()
    with make() as batches:
        got = list(batches.iterate(0, stop_step=7))
    assert [s for s, _ in got] == list(range(7))
    for step, batch in got:
        want = reference.batch_at(step)
        for key in want:
            np.testing.assert_array_equal(batch[key], want[key])

    # A "training run": state folds in every batch. Killed after step 3 and resumed from a fresh
    # object at step 3, it must end where the uninterrupted run ends.
    def run(steps):
        state = np.zeros(2)
        for _, batch in steps:
            state = state * 0.5 + np.array([batch["index"].sum(), batch["draw"].sum() % 1000])
        return state

    uninterrupted = run(make().iterate(0, stop_step=8))
    first = make()
    state = np.zeros(2)
    for _, batch in first.iterate(0, stop_step=3):
        state = state * 0.5 + np.array([batch["index"].sum(), batch["draw"].sum() % 1000])
    for _, batch in make().iterate(3, stop_step=8):
        state = state * 0.5 + np.array([batch["index"].sum(), batch["draw"].sum() % 1000])
    np.testing.assert_array_equal(state, uninterrupted)


def test_abandoned_iterator_stops_its_thread():
    batches = IndexedBatches(ArraySource(20), global_batch_size=4, seed=0, prefetch=2)
    it = batches.iterate(0)
    for step, _ in it:
        if step == 3:
            break
    it.close()
    assert not any(t.name == "IndexedBatches-prefetch" and t.is_alive() for t in threading.enumerate())


class Broken(ArraySource):
    def __getitem__(self, i):
        if i == 3:
            raise RuntimeError("corrupt record 3")
        return super().__getitem__(i)


def test_loading_error_surfaces_at_its_step():
    batches = IndexedBatches(Broken(8), global_batch_size=2, seed=0, shuffle=False, prefetch=2)
    seen = []
    with pytest.raises(RuntimeError, match="corrupt record 3"):
        for step, _ in batches.iterate(0):
            seen.append(step)
    assert seen == [0]  # step 1 holds index 3


@pytest.mark.parametrize(
    "kwargs,source_len,message",
    [
        (dict(global_batch_size=6, process_count=4), 20, "not divisible by process_count"),
        (dict(global_batch_size=4), 0, "source is empty"),
        (dict(global_batch_size=8), 5, "larger than the source"),
        (dict(global_batch_size=4, process_index=2, process_count=2), 20, "process_index"),
        (dict(global_batch_size=0), 20, "must be positive"),
    ],
)
def test_bad_configuration_is_named(kwargs, source_len, message):
    with pytest.raises(ValueError, match=message):
        IndexedBatches(ArraySource(source_len), seed=0, **kwargs)


def test_unstackable_examples_are_named():
    class Ragged(ArraySource):
        def __getitem__(self, i):
            return {"image": np.zeros((i + 1, 2), np.uint8)}

    batches = IndexedBatches(Ragged(4), global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="'image' has different shapes.*preprocess"):
        batches.batch_at(0)

    class NotDict(ArraySource):
        def __getitem__(self, i):
            return np.zeros(3)

    with pytest.raises(TypeError, match="dict of arrays"):
        IndexedBatches(NotDict(4), global_batch_size=2, seed=0).batch_at(0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        IndexedBatches(ArraySource(4), global_batch_size=2, seed=0).batch_at(-1)


def assert_identical(got: dict, want: dict) -> None:
    """Byte for byte: the same names, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(want)
    for key in want:
        assert type(got[key]) is np.ndarray, (key, type(got[key]))
        assert (got[key].dtype, got[key].shape) == (want[key].dtype, want[key].shape), key
        assert got[key].tobytes() == want[key].tobytes(), key


def test_worker_processes_give_the_thread_batches_from_any_start_step():
    # 9 examples, batch 4: the steps straddle epochs, as a resumed run's do.
    def make(**kw):
        return IndexedBatches(ArraySource(9), global_batch_size=4, seed=2, preprocess=draw_preprocess,
                              **kw)

    threads = make(num_workers=2)
    lines: list[str] = []
    processes = make(worker_processes=2, log=lines.append)
    # A run resumed at step 5 (the tests below start at 0; worker processes start slowly).
    got = list(processes.iterate(5, stop_step=10))
    assert [s for s, _ in got] == list(range(5, 10))
    for step, batch in got:
        assert_identical(batch, threads.batch_at(step))
    assert lines == []  # no fallback: the processes did run


class WhereAmI(ArraySource):
    """Records the process that read each example and the state of JAX there; index 3's image
    cannot be read (images.ReplaceBadImages replaces it by index 4); reading index 9 fails."""

    def __getitem__(self, i):
        if i == 3:
            raise images.BadImage(f"record {i}", "truncated JPEG")
        if i == 9:
            raise RuntimeError("corrupt record 9")
        import jax
        from jax._src import xla_bridge

        return {**super().__getitem__(i), "pid": np.int64(os.getpid()),
                "jax_initialised": np.bool_(xla_bridge.backends_are_initialized()),
                "jax_cpu_only": np.bool_(jax.config.jax_platforms == "cpu"),
                "signals_ignored": np.bool_(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
                                            and signal.getsignal(signal.SIGINT) == signal.SIG_IGN)}


def test_worker_processes_leave_jax_alone_report_bad_images_and_raise_at_the_step(monkeypatch):
    # The workers inherit the environment: without tests/conftest.py's JAX_PLATFORMS=cpu, only
    # the loader's own worker set-up keeps JAX there off an accelerator.
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    printed: list[str] = []
    source = images.ReplaceBadImages(WhereAmI(12), name="train", log=printed.append)
    batches = IndexedBatches(source, global_batch_size=4, seed=0, shuffle=False, worker_processes=2)
    got = []
    with pytest.raises(RuntimeError, match="corrupt record 9"):
        for step, batch in batches.iterate(0):
            got.append(batch)
    assert len(got) == 2  # steps 0 and 1; step 2 holds index 9
    pids = {int(p) for b in got for p in b["pid"]}
    assert os.getpid() not in pids and len(pids) == 2  # step 0 in one worker, step 1 in the other
    for b in got:
        assert not b["jax_initialised"].any()  # unpickling the loader started no JAX backend
        assert b["jax_cpu_only"].all()  # and one started there could not take the accelerator
        assert b["signals_ignored"].all()  # a preemption's SIGTERM is the trainer's to handle
    np.testing.assert_array_equal(got[0]["index"], [0, 1, 2, 4])  # 3 replaced, as in threads
    # The worker found the bad image; this process's count (the logged data/bad_images) has it.
    assert batches.num_bad_images == 1 and 3 in source.bad
    assert printed == []  # the line was printed by the worker that found it


class Unpicklable(ArraySource):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.lock = threading.Lock()  # e.g. a handle of an open file or connection


def test_unpicklable_source_falls_back_to_threads_with_one_line():
    lines: list[str] = []
    batches = IndexedBatches(Unpicklable(10), global_batch_size=4, seed=1, num_workers=2,
                             worker_processes=2, log=lines.append)
    got = list(batches.iterate(2, stop_step=5))
    assert [s for s, _ in got] == [2, 3, 4]
    for step, batch in got:
        assert_identical(batch, batches.batch_at(step))
    assert len(lines) == 1, lines
    assert re.search(r"2 threads in this process, not 2 worker processes: the source or "
                     r"preprocess cannot be pickled \(TypeError: .*lock", lines[0]), lines[0]


def test_the_loader_pickles_without_its_threads():
    batches = IndexedBatches(ArraySource(10), global_batch_size=4, seed=1, num_workers=2)
    before = batches.batch_at(3)  # starts the thread pool and fills the order cache
    again = pickle.loads(pickle.dumps(batches))
    assert again._pool is None
    assert_identical(again.batch_at(3), before)
    with pytest.raises(ValueError, match="worker_processes must be >= 0"):
        IndexedBatches(ArraySource(4), global_batch_size=2, seed=0, worker_processes=-1)


@pytest.mark.parametrize("name,processes", [
    ("lqae_roberta", 8), ("vlap_opt", 8), ("vlap_t5", 8),  # the papers' JPEG pipelines
    ("lqae_demo", 0), ("lqae_tiny", 0), ("vlap_demo", 0),  # in-memory digits: start-up would cost
])
def test_configs_choose_worker_processes(name, processes):
    assert load_config(name).data.worker_processes == processes
