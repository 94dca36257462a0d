"""Deterministic, resumable, per-process batches from any random-access source.

The trainer asks for batch number ``step``; the answer is a pure function of (source, seed, step),
so a run killed after step k and restarted from its checkpoint at step k sees exactly the batches
an uninterrupted run would have seen, and so ends with the same parameters. There is no iterator
state to checkpoint: the step counter in the train state is the whole data state.

Order. The data is an endless stream of epochs; global example position ``p = step * G + j``
(``G`` the global batch size, ``j`` in [0, G)) is example ``perm_e[p % n]`` of epoch ``e = p // n``,
where ``perm_e = np.random.default_rng([seed, e]).permutation(n)``. A batch may straddle two epochs;
nothing is dropped, and every epoch visits each example exactly once.

Processes. Process ``k`` of ``P`` loads positions ``j`` in ``[k * G/P, (k+1) * G/P)`` of each global
batch, so concatenating the processes' batches in process order gives the global batch (the layout
``jax.make_array_from_process_local_data`` expects for a batch sharded along its first axis).

Unreadable images. A source may replace an example whose image cannot be read by another chosen
from its index alone (``data/images.py``), which keeps batches pure functions of the step; the
count is ``num_bad_images``.

Augmentation. ``preprocess(example, rng)`` receives a generator seeded from
``(seed, global position p)``: the same example at the same position gets the same crop on every
run, whatever the process count or worker count.

Worker processes. With ``worker_processes=W > 0``, :meth:`iterate` runs this object's own
``batch_at(s)`` in W grain worker processes (``grain.MapDataset.range(start, stop).map(...)
.to_iter_dataset().mp_prefetch(W)``: worker i computes steps start + i, start + i + W, ...; grain
hands them back in step order). The batches are byte-identical to the thread path's, because they
are the same function of the step, and there is still no iterator state to checkpoint. PIL
releases the GIL only inside decode and resize, so processes scale where threads stall
(bench/RESULTS.md, "Batch loader"). grain starts its workers with ``spawn`` (never ``fork``, so a
running JAX backend is never copied), pickles this object (source and preprocess included) into
each of them, and each worker pins JAX to the CPU before unpickling it, so that a preprocess which
happens to touch JAX cannot claim the accelerator, and ignores SIGTERM and SIGINT (the trainer
saves on them, then closes the iterator, which stops the workers). A source or preprocess that cannot be pickled,
or a missing grain, falls back to the threads with one logged line saying why.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import itertools
import operator
import queue
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np

Example = dict[str, Any]
Preprocess = Callable[[Example, np.random.Generator], Example]

# A third seed word keeps augmentation streams apart from the permutation streams
# default_rng([seed, epoch]); without it position p and epoch p would share one stream.
_AUGMENT_STREAM = 0xA06

# An endless run's range for grain (MapDataset.range needs a stop): 2**62 steps never end.
_ENDLESS_STEPS = 2**62


class RandomAccessSource(Protocol):
    """What IndexedBatches reads: ``len(source)`` and ``source[i] -> {name: array}``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


class IndexedBatches:
    """Batch ``step`` of an endless shuffled stream over ``source``; see the module docstring.

    Args:
      source: random-access examples, ``source[i] -> {name: array-like}``; every example must give
        the same names and (after ``preprocess``) the same shapes, so they stack.
      global_batch_size: examples per step summed over all processes.
      seed: selects the permutations and the augmentation streams.
      shuffle: False reads the source in order, epoch after epoch.
      process_index, process_count: this process's slice of each global batch
        (``jax.process_index()``, ``jax.process_count()`` in a multi-host run).
      preprocess: ``f(example, rng) -> example``, applied per example before stacking.
      num_workers: threads that load and preprocess examples in parallel (0: in the caller's thread).
        PIL decoding and resizing release the GIL, so threads do scale for image work.
      prefetch: batches :meth:`iterate` prepares ahead in a background thread (0: none); with
        worker processes, batches buffered across them (at least one per process).
      worker_processes: grain worker processes that compute the batches of :meth:`iterate`
        (module docstring; 0: threads in this process). Each process loads its batch with
        ``max(1, num_workers)`` threads of its own. :meth:`batch_at` always runs in the caller's
        process.
      batch_size_name: what the user sets ``global_batch_size`` with (e.g.
        'config.eval.batch_size'), named in the errors about it.
      log: prints one line (default ``print``): why worker processes were not used.
    """

    def __init__(
        self,
        source: RandomAccessSource,
        *,
        global_batch_size: int,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        preprocess: Preprocess | None = None,
        num_workers: int = 0,
        prefetch: int = 2,
        worker_processes: int = 0,
        batch_size_name: str = "global_batch_size",
        log: Callable[[str], None] | None = None,
    ) -> None:
        name = batch_size_name
        try:
            n = len(source)
        except TypeError as e:
            raise TypeError(
                f"source must be a random-access sequence with __len__ and __getitem__, got {type(source).__name__}"
            ) from e
        if n == 0:
            raise ValueError("source is empty (len 0); check the split name and the data directory.")
        if global_batch_size <= 0:
            raise ValueError(f"{name} must be positive, got {global_batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(
                f"need 0 <= process_index < process_count, got process_index={process_index}, "
                f"process_count={process_count}"
            )
        if global_batch_size % process_count:
            raise ValueError(
                f"{name}={global_batch_size} is not divisible by process_count {process_count}; "
                f"every process loads an equal share, so pick a multiple of {process_count}."
            )
        if global_batch_size > n:
            raise ValueError(
                f"{name}={global_batch_size} is larger than the source ({n} examples): one batch "
                f"would hold the same example more than once. Set {name} to at most {n} or use a "
                "larger split."
            )
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer (NumPy SeedSequence), got {seed}")
        if num_workers < 0 or prefetch < 0 or worker_processes < 0:
            raise ValueError(f"num_workers, prefetch and worker_processes must be >= 0, got "
                             f"{num_workers}, {prefetch} and {worker_processes}")
        self.source = source
        self.num_examples = n
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.preprocess = preprocess
        self.num_workers = int(num_workers)
        self.prefetch = int(prefetch)
        self.worker_processes = int(worker_processes)
        self.log = log or _print_line
        self._sent_bad = 0  # in a worker process: bad images already reported to the parent
        self._init_local_state()

    def _init_local_state(self) -> None:
        # What each process builds for itself: neither threads nor locks pickle, and the cache
        # is cheaper to rebuild than to ship.
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # A batch touches at most two epochs, and prefetching runs a few steps ahead: a tiny cache
        # saves recomputing an ImageNet-sized permutation (~20 ms) for every batch.
        self._epoch_order = functools.lru_cache(maxsize=4)(self._compute_epoch_order)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_pool", "_pool_lock", "_epoch_order"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_local_state()

    @property
    def num_bad_images(self) -> int:
        """Examples whose image could not be read, found so far by the source (0 for sources
        that never have any): ``data/images.py`` ReplaceBadImages, or a feature cache's record
        of them. For the metrics (``data/bad_images``)."""
        return int(getattr(self.source, "num_bad_images", 0))

    @property
    def steps_per_epoch(self) -> float:
        """Steps that make one pass over the source (fractional when G does not divide n)."""
        return self.num_examples / self.global_batch_size

    def _compute_epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def positions_at(self, step: int) -> np.ndarray:
        """Global example positions this process loads for ``step``. Returns: [local_batch] int64."""
        step = operator.index(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        first = step * self.global_batch_size + self.process_index * self.local_batch_size
        return np.arange(first, first + self.local_batch_size, dtype=np.int64)

    def indices_at(self, step: int) -> np.ndarray:
        """Source indices this process loads for ``step``. Returns: [local_batch] int64."""
        positions = self.positions_at(step)
        epochs, offsets = np.divmod(positions, self.num_examples)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._epoch_order(int(epoch))[offsets[sel]]
        return out

    def _load(self, position: int, index: int) -> Example:
        example = self.source[int(index)]
        if not isinstance(example, Mapping):
            raise TypeError(
                f"source[{index}] returned {type(example).__name__}; sources must return a dict of arrays "
                "like {'image': uint8 [H, W, 3], 'label': int32}."
            )
        example = dict(example)
        if self.preprocess is not None:
            rng = np.random.default_rng([self.seed, int(position), _AUGMENT_STREAM])
            example = self.preprocess(example, rng)
        return example

    def _executor(self, threads: int) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    threads, thread_name_prefix="IndexedBatches"
                )
            return self._pool

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch ``step``: {name: [global_batch / process_count, ...]}."""
        return self._batch_at(step, self.num_workers)

    def _batch_at(self, step: int, threads: int) -> dict[str, np.ndarray]:
        positions = self.positions_at(step)
        indices = self.indices_at(step)
        if threads > 0:
            examples = list(self._executor(threads).map(self._load, positions, indices))
        else:
            examples = [self._load(p, i) for p, i in zip(positions, indices)]
        return _stack(examples, indices)

    def iterate(self, start_step: int = 0, stop_step: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yields ``(step, batch_at(step))`` for step = start_step, start_step + 1, ... (< stop_step).

        With ``prefetch > 0`` a background thread keeps up to ``prefetch`` batches ready; with
        ``worker_processes > 0`` grain's worker processes compute them (module docstring). Closing
        the generator (or dropping it) stops the thread or the processes; an error while loading
        is raised here, at the step it belongs to.
        """
        start_step = operator.index(start_step)
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if stop_step is not None and stop_step < start_step:
            raise ValueError(f"stop_step {stop_step} is before start_step {start_step}")
        if self.worker_processes > 0:
            why_not = self._why_not_processes()
            if why_not is None:
                yield from self._in_processes(start_step, stop_step)
                return
            self.log(f"data: loading batches with {self.num_workers} threads in this process, not "
                     f"{self.worker_processes} worker processes: {why_not}")
        if self.prefetch == 0:
            step = start_step
            while stop_step is None or step < stop_step:
                yield step, self.batch_at(step)
                step += 1
            return
        yield from self._prefetched(start_step, stop_step)

    def _prefetched(self, start_step: int, stop_step: int | None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            # Polls so that a consumer who walks away never leaves this thread blocked forever.
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            step = start_step
            while (stop_step is None or step < stop_step) and not stop.is_set():
                try:
                    item = (step, self.batch_at(step))
                except BaseException as e:  # handed to the consumer, raised at this step
                    put(e)
                    return
                if not put(item):
                    return
                step += 1
            put(done)

        thread = threading.Thread(target=produce, name="IndexedBatches-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=10.0)

    def _why_not_processes(self) -> str | None:
        """None if this object can go to grain's worker processes, else the reason why not."""
        if importlib.util.find_spec("grain") is None:
            return "grain is not installed (pip install grain)"
        import cloudpickle  # noqa: PLC0415  (grain's dependency: grain pickles with it)

        try:
            cloudpickle.dumps(self)
        except Exception as e:  # noqa: BLE001  (any failure to pickle means: stay in threads)
            what = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return (f"the source or preprocess cannot be pickled ({type(e).__name__}: "
                    f"{what[:200]})")
        return None

    def _in_processes(self, start_step: int, stop_step: int | None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        import grain  # noqa: PLC0415
        from absl import flags  # noqa: PLC0415

        if not flags.FLAGS.is_parsed():
            # grain reads its absl flags when it starts workers; a library caller (a test, a
            # notebook) never parsed any: their defaults are what grain means then.
            flags.FLAGS.mark_as_parsed()
        stop = start_step + _ENDLESS_STEPS if stop_step is None else stop_step
        workers = self.worker_processes
        ds = (grain.MapDataset.range(start_step, stop).map(self._batch_in_worker)
              # No threads inside a worker beyond batch_at's own: one batch at a time, in order.
              .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
              .mp_prefetch(grain.MultiprocessingOptions(
                  num_workers=workers, per_worker_buffer_size=max(1, -(-self.prefetch // workers))),
                  worker_init_fn=_worker_init))
        it = iter(ds)
        try:
            for expected in itertools.count(start_step):
                try:
                    step, batch, bad = next(it)
                except StopIteration:
                    return
                if step != expected:  # grain's interleave keeps order; never hand out a wrong step
                    raise RuntimeError(f"grain returned step {step} where step {expected} was due")
                if bad:
                    merge = getattr(self.source, "merge_bad_images", None)
                    if merge is not None:
                        merge(bad)
                # Plain arrays, as the threads give: grain's shared-memory views are freed now,
                # not whenever (or after interpreter shutdown, when) the caller drops them.
                yield step, {k: np.array(v) for k, v in batch.items()}
        finally:
            it.close()

    def _batch_in_worker(self, step: int) -> tuple[int, dict[str, np.ndarray], dict[int, str]]:
        """In a worker process: (step, batch_at(step), unreadable images found since the last
        batch), the last for the parent's count (``num_bad_images``)."""
        # At least one loading thread: in the worker's main thread (grain's loop) the same JPEG
        # work ran at a third of the rate, half of it spent waiting (bench/RESULTS.md).
        batch = self._batch_at(step, max(1, self.num_workers))
        found = getattr(self.source, "bad", None)
        new: dict[int, str] = {}
        if isinstance(found, dict) and len(found) > self._sent_bad:
            new = dict(list(found.items())[self._sent_bad:])
            self._sent_bad = len(found)
        return int(step), batch, new

    def close(self) -> None:
        """Stops the worker threads (if any). The object stays usable; threads restart on demand."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> IndexedBatches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _print_line(line: str) -> None:
    print(line, flush=True)


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Runs first in each grain worker process: JAX there may compute on the CPU only (the
    parent holds the accelerator; a worker that initialised it would take its memory), and
    SIGTERM / SIGINT are the parent's to handle: a preemption or Ctrl-C sent to the whole process
    group must not kill a worker under the trainer, which saves a checkpoint and then stops them."""
    del worker_index, worker_count
    import jax  # noqa: PLC0415  (grain imports it already; nothing is initialised by importing)

    jax.config.update("jax_platforms", "cpu")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stack(examples: list[Example], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Stacks per-example dicts into a batch, naming the culprit when they disagree."""
    keys = list(examples[0])
    batch: dict[str, np.ndarray] = {}
    for example, index in zip(examples, indices):
        if set(example) != set(keys):
            raise ValueError(
                f"example {index} has fields {sorted(example)} but example {indices[0]} has {sorted(keys)}; "
                "every example (after preprocess) must have the same fields."
            )
    for key in keys:
        values = [np.asarray(example[key]) for example in examples]
        shapes = {v.shape for v in values}
        if len(shapes) > 1:
            raise ValueError(
                f"field {key!r} has different shapes across the batch ({sorted(shapes)[:4]}...); pass a "
                "preprocess that brings every example to one size (e.g. imagenet_preprocess for images)."
            )
        batch[key] = np.stack(values)
    return batch
