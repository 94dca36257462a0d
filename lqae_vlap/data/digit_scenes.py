"""Digit scenes: SYNTHETIC compositions of REAL handwritten digits, captioned from ground truth.

Every scene is drawn here from a seed; only the digits in it are real: scikit-learn's handwritten
digits (1,797 greyscale 8x8 scans, ``sklearn.datasets.load_digits``, loaded as
``demo_images.DemoImages`` loads them), upsampled, coloured and pasted on a black RGB canvas.
For retrieval and visual semantic arithmetic that are real tasks (the demo's ten one-word
captions are not): thousands of distinct captions and pairs of scenes that differ in one digit.

A scene (``SceneSpec``) holds 1 or 2 digits, one per half of the canvas (slot 0 = left half,
slot 1 = right half). Each digit has
  digit    0-9 (a real scan of that digit; ``scan``: its index in ``load_digits()``),
  colour   one of ``COLOURS`` (red, green, blue, yellow, white): the scan's ink times that RGB,
  size     'small' (``5/16`` of the canvas side) or 'large' (half of it),
  offset   where in its half it sits (a seeded jitter, so no two scenes need share pixels).
Captions (``caption``), with the relation word drawn per scene:
  one digit   "a large red seven on the left"
  two digits  "a large red seven left of a small blue two" or "a small blue two right of a large
              red seven"
``parse_caption`` reads one back into (slot, digit, colour, size) tuples. 200 one-digit and
20,000 two-digit captions are possible.

Splits (``SPLITS``) and what keeps them apart:
  * Digit scans: train scenes use scans 0..1499 (``DemoImages``' train split), validation
    1500..1647, test 1648..1796: no real digit sample appears in two splits.
  * Held-out combinations (``HELD_OUT``): digit d in colour ``COLOURS[d % 5]`` (a red zero, a
    green one, a blue two, a yellow three, a white four, a red five, ..., a white nine): 10 of the
    50 digit-colour combinations NEVER appear in a training scene and appear, uniformly with
    the rest, in validation and test scenes (about 1 digit in 5 there).
  * Validation and test scenes come in pairs (``2k``, ``2k + 1``) identical in everything
    (colours, sizes, offsets, relation word, the other digit's scan) except one digit, which is
    another digit (and so another scan): the targets of ``arithmetic_pairs``. Training scenes
    are independent draws.

Random access like ``DemoImages``: ``DigitScenes(split)[i] -> {'image': uint8 [S, S, 3],
'caption': str, 'label': int32 (the leftmost digit), 'digits', 'colours', 'sizes': int32 [2]
(per slot; -1 where the slot is empty), 'scans': int32 [2]}``; ``spec(i)`` gives the structured
``SceneSpec``. Scene i is a pure function of (seed, split, i): two constructions agree, whatever
order examples are read in.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

from lqae_vlap.data import demo_images
from lqae_vlap.data.indexing import check_index

BANNER = ("digit scenes: SYNTHETIC compositions of REAL handwritten digits (scikit-learn's "
          "8x8 scans, coloured and placed by a seeded generator; captions from the scene's "
          "ground truth)")
SPLITS = ("train", "validation", "test")
DIGIT_NAMES = demo_images.DIGIT_NAMES
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 40, 40), "green": (40, 220, 40), "blue": (60, 90, 255),
    "yellow": (250, 230, 40), "white": (255, 255, 255)}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
SIDES = ("left", "right")
# (digit, colour index) pairs that no training scene holds (module docstring).
HELD_OUT: frozenset[tuple[int, int]] = frozenset((d, d % len(COLOURS)) for d in range(10))
# Scan ranges of load_digits() per split: train = DemoImages' train split; the 297 after it
# halved into validation and test.
_SCANS = {"train": (0, 1500), "validation": (1500, 1648), "test": (1648, 1797)}
_SPLIT_ID = {s: n for n, s in enumerate(SPLITS)}
_DIGIT_LEVELS = 16.0  # load_digits' ink counts 0..16


@dataclasses.dataclass(frozen=True)
class DigitSpec:
    """One digit of a scene: slot 0 (left half) or 1 (right half); indices into DIGIT_NAMES,
    COLOUR_NAMES, SIZES; scan: its row of load_digits(); (dy, dx): its top-left corner inside
    its half, in pixels."""

    slot: int
    digit: int
    colour: int
    size: int
    scan: int
    dy: int
    dx: int

    def words(self) -> str:
        return f"a {SIZES[self.size]} {COLOUR_NAMES[self.colour]} {DIGIT_NAMES[self.digit]}"


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """A scene: its digits in slot order, and for two digits which one the caption names first
    (``first`` = its slot: "X left of Y" names the left one first, "X right of Y" the right)."""

    objects: tuple[DigitSpec, ...]
    first: int

    def caption(self) -> str:
        if len(self.objects) == 1:
            o = self.objects[0]
            return f"{o.words()} on the {SIDES[o.slot]}"
        left, right = self.objects
        return (f"{left.words()} left of {right.words()}" if self.first == 0
                else f"{right.words()} right of {left.words()}")

    def attributes(self) -> tuple[tuple[int, int, int, int], ...]:
        """(slot, digit, colour, size) per digit, in slot order: what a caption says."""
        return tuple((o.slot, o.digit, o.colour, o.size) for o in self.objects)


_OBJECT = r"a (small|large) (" + "|".join(COLOUR_NAMES) + r") (" + "|".join(DIGIT_NAMES) + r")"
_ONE = re.compile(rf"^{_OBJECT} on the (left|right)$")
_TWO = re.compile(rf"^{_OBJECT} (left|right) of {_OBJECT}$")


def parse_caption(caption: str) -> tuple[tuple[int, int, int, int], ...]:
    """A scene caption back to its (slot, digit, colour, size) tuples in slot order (the
    inverse of ``SceneSpec.caption`` on ``SceneSpec.attributes``); ValueError if it is not one."""

    def obj(slot: int, size: str, colour: str, digit: str) -> tuple[int, int, int, int]:
        return (slot, DIGIT_NAMES.index(digit), COLOUR_NAMES.index(colour), SIZES.index(size))

    if m := _ONE.match(caption):
        size, colour, digit, side = m.groups()
        return (obj(SIDES.index(side), size, colour, digit),)
    if m := _TWO.match(caption):
        s1, c1, d1, relation, s2, c2, d2 = m.groups()
        named_first = 0 if relation == "left" else 1
        a, b = obj(named_first, s1, c1, d1), obj(1 - named_first, s2, c2, d2)
        return (a, b) if named_first == 0 else (b, a)
    raise ValueError(f"not a digit-scene caption: {caption!r}")


@functools.lru_cache(maxsize=1)
def _scans() -> tuple[np.ndarray, np.ndarray]:
    """load_digits() as float32 ink in [0, 1] [1797, 8, 8], and its labels [1797]."""
    from sklearn.datasets import load_digits  # deferred, as in demo_images

    d = load_digits()
    ink = (d.images.astype(np.float32) / np.float32(_DIGIT_LEVELS))
    return ink, d.target.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _resized(side: int) -> np.ndarray:
    """Every scan bilinearly resized to side x side in PIL's float mode: [1797, side, side]."""
    ink, _ = _scans()
    out = np.stack([np.asarray(Image.fromarray(g).resize((side, side), Image.Resampling.BILINEAR))
                    for g in ink])
    out = np.clip(out, 0.0, 1.0)
    out.setflags(write=False)
    return out


def size_pixels(image_size: int) -> tuple[int, int]:
    """(small, large) digit side in pixels on a canvas of ``image_size``."""
    return max(4, image_size * 5 // 16), image_size // 2


class DigitScenes:
    """Synthetic scenes of real sklearn digits (module docstring); random access.

    Args:
      split: 'train', 'validation' or 'test'.
      num_scenes: how many scenes the split has (validation and test: rounded down to even,
        as they come in pairs).
      image_size: canvas side S (>= 16); digits are 5S/16 (small) or S/2 (large) pixels.
      seed: the generator's seed; scene i is a function of (seed, split, i).
      two_digit_fraction: the share of scenes with two digits (the rest have one).
    """

    class_names: tuple[str, ...] = DIGIT_NAMES
    num_classes: int = len(DIGIT_NAMES)
    banner: str = BANNER

    def __init__(self, split: str = "train", num_scenes: int = 0, image_size: int = 32,
                 seed: int = 0, two_digit_fraction: float = 0.75) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; digit scenes have splits {SPLITS}")
        size = operator.index(image_size)
        if size < 16:
            raise ValueError(f"digit scenes need image_size >= 16, got {image_size}")
        n = operator.index(num_scenes) or (20000 if split == "train" else 1000)
        if n < (1 if split == "train" else 2):
            raise ValueError(f"num_scenes must be >= 1 (2 for {split!r}), got {num_scenes}")
        if not 0.0 <= float(two_digit_fraction) <= 1.0:
            raise ValueError(f"two_digit_fraction must be in [0, 1], got {two_digit_fraction}")
        self.split, self.image_size, self.seed = split, size, int(seed)
        self.two_digit_fraction = float(two_digit_fraction)
        self.paired = split != "train"
        self.num_scenes = n - n % 2 if self.paired else n
        lo, hi = _SCANS[split]
        _, labels = _scans()
        # The split's scans of each digit, as indices into load_digits().
        self._by_digit = [lo + np.flatnonzero(labels[lo:hi] == d) for d in range(10)]
        self._sides = size_pixels(size)

    def __len__(self) -> int:
        return self.num_scenes

    def _check(self, index: int) -> int:
        return check_index(index, len(self), f"DigitScenes({self.split!r})")

    def _draw(self, rng: np.random.Generator) -> SceneSpec:
        two = rng.random() < self.two_digit_fraction
        slots = (0, 1) if two else (int(rng.integers(2)),)
        objects = []
        for slot in slots:
            digit = int(rng.integers(10))
            colours = [c for c in range(len(COLOURS))
                       if self.split != "train" or (digit, c) not in HELD_OUT]
            colour = int(colours[rng.integers(len(colours))])
            sz = int(rng.integers(len(SIZES)))
            side = self._sides[sz]
            objects.append(DigitSpec(
                slot=slot, digit=digit, colour=colour, size=sz,
                scan=int(rng.choice(self._by_digit[digit])),
                dy=int(rng.integers(self.image_size - side + 1)),
                dx=int(rng.integers(self.image_size // 2 - side + 1))))
        return SceneSpec(objects=tuple(objects), first=int(rng.integers(2)) if two else 0)

    def spec(self, index: int) -> SceneSpec:
        """Scene ``index``'s ground truth. Validation / test: scene 2k+1 is scene 2k with one
        digit changed to another (its own scan of that digit), everything else the same."""
        i = self._check(index)
        group = i // 2 if self.paired else i
        rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], group])
        base = self._draw(rng)
        if not self.paired or i % 2 == 0:
            return base
        k = int(rng.integers(len(base.objects)))
        old = base.objects[k]
        digit = int((old.digit + 1 + rng.integers(9)) % 10)  # any other digit
        new = dataclasses.replace(old, digit=digit, scan=int(rng.choice(self._by_digit[digit])))
        objects = tuple(new if j == k else o for j, o in enumerate(base.objects))
        return dataclasses.replace(base, objects=objects)

    def render(self, spec: SceneSpec) -> np.ndarray:
        """The scene's pixels: uint8 [S, S, 3], each digit's ink times its colour on black."""
        canvas = np.zeros((self.image_size, self.image_size, 3), np.float32)
        half = self.image_size // 2
        for o in spec.objects:
            side = self._sides[o.size]
            ink = _resized(side)[o.scan][..., None] * np.asarray(COLOURS[COLOUR_NAMES[o.colour]],
                                                                 np.float32)
            y, x = o.dy, o.slot * half + o.dx
            window = canvas[y:y + side, x:x + side]
            np.maximum(window, ink, out=window)
        return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    def fields_without_image(self, index: int) -> dict[str, Any]:
        """Example ``index`` minus 'image' (for cached vision features): caption and attributes."""
        spec = self.spec(index)
        digits, colours, sizes, scans = (np.full(2, -1, np.int32) for _ in range(4))
        for o in spec.objects:
            digits[o.slot], colours[o.slot], sizes[o.slot], scans[o.slot] = (
                o.digit, o.colour, o.size, o.scan)
        return {"caption": spec.caption(), "label": np.int32(spec.objects[0].digit),
                "digits": digits, "colours": colours, "sizes": sizes, "scans": scans}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.render(self.spec(index)), **self.fields_without_image(index)}

    @property
    def captions(self) -> list[str]:
        """Every caption of the split, in order (e.g. for word frequencies)."""
        return [self.spec(i).caption() for i in range(len(self))]


def arithmetic_pairs(source: DigitScenes, indices: Iterable[int] | None = None
                     ) -> list[tuple[int, str, str, int]]:
    """(query, word a, word b, target) for visual semantic arithmetic within ``indices`` (the
    gallery; default: the whole split): image(query) - word(a) + word(b) should land on
    image(target), the scene that differs from the query in exactly one digit, a -> b, with
    every other attribute (colours, sizes, places, relation word, the other digit) the same.

    Found by matching scenes' ground truth, so both members of a pair must be in ``indices``;
    queries holding digit a twice are left out (which of the two to change would be ambiguous).
    Sorted by query.
    """
    idx = range(len(source)) if indices is None else [operator.index(i) for i in indices]
    groups: dict[Any, list[tuple[int, int, int]]] = {}  # everything but one digit -> members
    for i in idx:
        spec = source.spec(i)
        for k, o in enumerate(spec.objects):
            rest = tuple(dataclasses.astuple(p) for j, p in enumerate(spec.objects) if j != k)
            key = (spec.first, o.slot, o.colour, o.size, o.dy, o.dx, rest)
            groups.setdefault(key, []).append((i, o.digit, len(spec.objects)))
    out = set()
    for members in groups.values():
        for q, a, _ in members:
            for t, b, _ in members:
                if a != b and _count(source.spec(q), a) == 1:
                    out.add((q, DIGIT_NAMES[a], DIGIT_NAMES[b], t))
    return sorted(out)


def _count(spec: SceneSpec, digit: int) -> int:
    return sum(o.digit == digit for o in spec.objects)


def held_out_count(spec: SceneSpec) -> int:
    """How many of the scene's digits are in a held-out (digit, colour) combination."""
    return sum((o.digit, o.colour) in HELD_OUT for o in spec.objects)


def scene_splits(image_size: int, num_train: int = 0, num_validation: int = 0,
                 num_test: int = 0, seed: int = 0, two_digit_fraction: float = 0.75
                 ) -> dict[str, DigitScenes]:
    """The three splits with one seed and canvas (0 scenes = the default count)."""
    kw = dict(image_size=image_size, seed=seed, two_digit_fraction=two_digit_fraction)
    return {"train": DigitScenes("train", num_train, **kw),
            "validation": DigitScenes("validation", num_validation, **kw),
            "test": DigitScenes("test", num_test, **kw)}

