"""Reading images from files and bytes, and what a run does with those that cannot be read.

Large crawled datasets always hold a few images that are missing, truncated or not images at all
(CC3M's img2dataset output, a hand-made JSONL folder). Every file-backed source raises
:class:`BadImage` for such an example (naming the file or record); :class:`ReplaceBadImages`,
which ``data/sources.py`` puts around those sources, then follows ``config.data.on_bad_image``:

  'skip'  (default) example i is replaced by the next example in index order whose image reads
          (i+1, i+2, ... wrapping around). That depends only on i and the files, not on what was
          read before, so batch s is still a pure function of s and a resumed run sees exactly the
          batches of an uninterrupted one. Each bad image is counted once (``num_bad_images``) and
          printed (the first ``PRINT_FIRST`` one by one, then at every power of ten).
  'fail'  the first bad image stops the run with one line naming it.
"""

from __future__ import annotations

import io
import operator
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

ON_BAD_IMAGE = ("skip", "fail")
PRINT_FIRST = 10
# PIL's errors for a file that is not a (whole) image: OSError covers UnidentifiedImageError and
# "image file is truncated"; some broken PNG/GIF chunks raise SyntaxError or EOFError.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class BadImage(ValueError):
    """An example whose image cannot be read: ``where`` (file or record) and ``reason``."""

    def __init__(self, where: str, reason: str) -> None:
        self.where, self.reason = str(where), str(reason)
        super().__init__(f"bad image {self.where}: {self.reason}")


def _reason(error: BaseException) -> str:
    # An OSError's strerror leaves out the file name, which BadImage already says.
    text = " ".join(str(getattr(error, "strerror", None) or error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def decode_image(data: Any, where: str = "an image") -> np.ndarray:
    """JPEG/PNG bytes (or an already decoded array) -> RGB uint8 [H, W, 3].

    ``convert('RGB')`` also handles the few greyscale and CMYK files in ImageNet. Bytes that are
    not a whole image raise :class:`BadImage` naming ``where``.
    """
    if isinstance(data, (bytes, bytearray, memoryview, np.bytes_)):
        try:
            with Image.open(io.BytesIO(bytes(data))) as img:
                return np.asarray(img.convert("RGB"))
        except UnidentifiedImageError as e:  # its message names an in-memory buffer, not the file
            raise BadImage(where, "UnidentifiedImageError: not an image PIL can read (corrupt, or "
                           "not an image file)") from e
        except _DECODE_ERRORS as e:
            raise BadImage(where, _reason(e)) from e
    image = np.asarray(data)
    if image.dtype == object and image.ndim == 0:  # a bytes scalar wrapped by NumPy
        return decode_image(image.item(), where)
    if image.dtype != np.uint8:
        raise TypeError(f"expected encoded image bytes or a uint8 array, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image [H, W, 1 or 3], got shape {image.shape}")
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """The image file at ``path`` as RGB uint8 [H, W, 3]; BadImage naming it when it is missing
    or cannot be decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(str(path), _reason(e)) from e
    return decode_image(data, str(path))


class ReplaceBadImages:
    """``source`` with each example whose image cannot be read replaced (module docstring).

    Args:
      source: random access, ``source[i]`` raising :class:`BadImage` for an unreadable image.
      on_bad_image: 'skip' or 'fail' (``config.data.on_bad_image``).
      name: the split, for the printed lines ('train', 'validation', ...).
      log: prints one line (default ``print``).

    Other attributes (``captions``, ``augment``, ``fields_without_image``, ...) are the source's.
    ``replacements`` maps each example replaced so far to the one that took its place.
    """

    def __init__(self, source: Any, on_bad_image: str = "skip", *, name: str = "data",
                 log: Callable[[str], None] | None = None) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"config.data.on_bad_image={on_bad_image!r} is not known; use 'skip' "
                             "(replace an unreadable image by the next readable example, and "
                             "count it) or 'fail' (stop at the first one)")
        self.source = source
        self.on_bad_image = on_bad_image
        self.name = name
        self.log = log or (lambda line: print(line, flush=True))
        self.bad: dict[int, str] = {}  # index -> why its image cannot be read
        self.replacements: dict[int, int] = {}
        self._lock = threading.Lock()  # IndexedBatches reads from several threads

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_bad_images(self) -> int:
        """Distinct examples found so far whose image cannot be read."""
        return len(self.bad)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.source)
        i = operator.index(index)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for {self.name} of length {n}")
        i %= n
        for k in range(n):
            j = (i + k) % n
            if j in self.bad:
                continue
            try:
                example = self.source[j]
            except BadImage as e:
                if self.on_bad_image == "fail":
                    raise ValueError(f"{e}; fix or remove it, or set config.data.on_bad_image="
                                     "'skip' to replace unreadable images and count them") from e
                self._found(j, e)
                continue
            if k:
                with self._lock:
                    self.replacements[i] = j
            return example
        raise ValueError(f"no image of {self.name} can be read ({n} examples, e.g. "
                         f"{next(iter(self.bad.values()), '?')}); check the paths in config.data")

    def merge_bad_images(self, found: Mapping[int, str]) -> None:
        """Adds unreadable images another process found (``data/batches.py``'s worker processes
        each read their own copy of this source), so ``num_bad_images`` counts them here too."""
        with self._lock:
            for index, why in found.items():
                self.bad.setdefault(int(index), str(why))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]  # a lock does not pickle; each process gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _found(self, index: int, error: BadImage) -> None:
        with self._lock:
            if index in self.bad:
                return
            self.bad[index] = str(error)
            count = len(self.bad)
        if count <= PRINT_FIRST:
            self.log(f"data: {self.name} example {index} skipped, {error} (bad images so far: "
                     f"{count}; config.data.on_bad_image='fail' stops instead)")
        elif str(count).rstrip("0") == "1":  # 100, 1000, ...
            self.log(f"data: {self.name}: {count} bad images skipped so far")

    def __getattr__(self, name: str) -> Any:
        if name in ("source", "bad", "replacements", "_lock"):  # not set yet (e.g. unpickling)
            raise AttributeError(name)
        return getattr(self.source, name)
