"""Pictures a person would rather look at than read, written to the workdir at each evaluation.

Three layouts, each a PNG of uint8 RGB (local or gs://, through core/files.py):
  captions        one row per held-out image: the image, then its generated captions (one line
                  per decoding: greedy, beam) and its reference captions;
  retrieval       one row per query: the query (an image, or a caption as text), then its top-k
                  results in rank order; the correct ones framed in ``CORRECT`` green, the others
                  in ``WRONG`` grey;
  reconstructions one row per image: the original and its reconstructions side by side, each
                  upsampled by an integer factor (nearest neighbour: no smoothing, every pixel an
                  exact square) to at least ``MIN_SIDE`` pixels, then the words it became.

Images come in as uint8 ``[H, W, C]`` (C = 1 or 3), already on the display scale: the caller owns
its pixel convention (ops/pixels.py). Text is drawn with PIL's default font (no download). Every
function returns a ``Picture``: the pixels and, for each cell ``(row, column)``, the box
``(top, left, height, width)`` its content occupies (tests and notebooks read tiles back by it).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from lqae_vlap.core import files

MIN_SIDE = 64  # smallest side of an image tile, in pixels
MAX_SIDE = 160  # largest side of an image tile (bigger photos are shrunk, with antialiasing)
PAD = 6  # white pixels between cells
BORDER = 4  # frame of a retrieval result
TEXT_WIDTH = 420  # width of a text column, in pixels
FONT_SIZE = 13
CORRECT = (0, 170, 0)  # frame of a correct retrieval result
WRONG = (200, 200, 200)  # frame of the other results
INK = (20, 20, 20)
LABEL_INK = (30, 80, 200)  # the "greedy:" / "reference:" labels
WHITE = 255

Box = tuple[int, int, int, int]  # (top, left, height, width)


@dataclasses.dataclass(frozen=True)
class Picture:
    """pixels: uint8 [H, W, 3]; cells: {(row, column): box of that cell's content}."""

    pixels: np.ndarray
    cells: dict[tuple[int, int], Box]

    def tile(self, row: int, column: int) -> np.ndarray:
        """The content of cell (row, column): uint8 [h, w, 3]."""
        top, left, h, w = self.cells[(row, column)]
        return self.pixels[top:top + h, left:left + w]


# -- building blocks -----------------------------------------------------------------------------


def _font(size: int = FONT_SIZE):
    from PIL import ImageFont  # noqa: PLC0415

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, OSError):
        return ImageFont.load_default()  # older Pillow: the fixed bitmap font


def _rgb(image: np.ndarray, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: images must be uint8 [H, W, 1 or 3], got dtype {image.dtype} "
                         f"shape {image.shape}; convert floats with ops/pixels.to_uint8")
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def upsample_factor(height: int, width: int, min_side: int = MIN_SIDE) -> int:
    """The integer factor that brings the shorter side to at least ``min_side`` (1 if it is)."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def fit(image: np.ndarray, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE) -> np.ndarray:
    """An image as a tile: small ones repeated by an integer factor (``np.repeat``: nearest
    neighbour, exact), large ones shrunk so the longer side is ``max_side``.

    image: uint8 [H, W, C] -> uint8 [h, w, 3].
    """
    image = _rgb(image, "fit")
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        from PIL import Image  # noqa: PLC0415

        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    k = upsample_factor(h, w, min_side)
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than the line is cut)."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:  # one very long word
                cut = max(1, int(len(line) * width / font.getlength(line)))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def text_block(parts: Sequence[tuple[str, str]], width: int = TEXT_WIDTH,
               max_lines: int = 12) -> np.ndarray:
    """Wrapped text on white: each part is (label, text), the label drawn in ``LABEL_INK``.

    Returns uint8 [h, width, 3]; at most ``max_lines`` lines (the rest cut with an ellipsis).
    """
    from PIL import Image, ImageDraw  # noqa: PLC0415

    font = _font()
    left, top, right, bottom = font.getbbox("Ag")
    line_h = int(bottom - min(top, 0)) + 4
    rows: list[tuple[str, str]] = []  # (label or '', text) per drawn line
    indent = "    "  # continuation lines
    for label, text in parts:
        prefix = f"{label}: " if label else ""
        margin = max(font.getlength(prefix), font.getlength(indent) if prefix else 0)
        wrapped = _wrap(text, font, max(20, int(width - margin)))
        rows.append((prefix, wrapped[0]))
        rows.extend(("", (indent if prefix else "") + w) for w in wrapped[1:])
    if len(rows) > max_lines:
        rows = rows[:max_lines - 1] + [("", "...")]
    canvas = Image.new("RGB", (width, line_h * max(1, len(rows)) + 2), (WHITE,) * 3)
    draw = ImageDraw.Draw(canvas)
    for i, (prefix, text) in enumerate(rows):
        y = 1 + i * line_h
        if prefix:
            draw.text((0, y), prefix, fill=LABEL_INK, font=font)
        draw.text((font.getlength(prefix), y), text, fill=INK, font=font)
    return np.asarray(canvas)


def framed(block: np.ndarray, colour: tuple[int, int, int], width: int = BORDER) -> np.ndarray:
    """A block with a ``width``-pixel frame of ``colour`` around it: [h + 2w, w + 2w, 3]."""
    out = np.empty((block.shape[0] + 2 * width, block.shape[1] + 2 * width, 3), np.uint8)
    out[:] = colour
    out[width:width + block.shape[0], width:width + block.shape[1]] = block
    return out


def compose(rows: Sequence[Sequence[np.ndarray]], pad: int = PAD) -> Picture:
    """Lays blocks out in a grid: every column as wide as its widest block, every row as tall as
    its tallest, blocks at the top left of their cells, ``pad`` white pixels around each cell.

    rows: lists of uint8 [h, w, 3] blocks (rows may differ in length). Returns the ``Picture``.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("compose needs at least one block")
    n_cols = max(len(r) for r in rows)
    col_w = [max((r[j].shape[1] for r in rows if j < len(r)), default=0) for j in range(n_cols)]
    row_h = [max((b.shape[0] for b in r), default=0) for r in rows]
    height = sum(row_h) + pad * (len(rows) + 1)
    width = sum(col_w) + pad * (n_cols + 1)
    pixels = np.full((height, width, 3), WHITE, np.uint8)
    cells: dict[tuple[int, int], Box] = {}
    top = pad
    for i, row in enumerate(rows):
        left = pad
        for j in range(n_cols):
            if j < len(row):
                b = row[j]
                pixels[top:top + b.shape[0], left:left + b.shape[1]] = b
                cells[(i, j)] = (top, left, b.shape[0], b.shape[1])
            left += col_w[j] + pad
        top += row_h[i] + pad
    return Picture(pixels, cells)


def save(picture: Picture, path: str | os.PathLike) -> Picture:
    """Writes ``picture.pixels`` as a PNG at ``path`` (local or gs://) and returns the picture."""
    from PIL import Image  # noqa: PLC0415

    files.makedirs(os.path.dirname(files.normalize(path)))
    buffer = io.BytesIO()
    Image.fromarray(picture.pixels).save(buffer, format="PNG")
    files.write_bytes(path, buffer.getvalue())
    return picture


# -- the three pictures --------------------------------------------------------------------------


def captions_picture(images: Sequence[np.ndarray], generated: Mapping[str, Sequence[str]],
                     references: Sequence[Sequence[str]], path: str | os.PathLike,
                     max_references: int = 2) -> Picture:
    """Held-out images with their generated captions beside their references.

    images: n uint8 [H, W, C]; generated: {decoding name ('greedy', 'beam3'): n captions};
    references: per image its reference captions (the first ``max_references`` are shown).
    Row i: cell (i, 0) the image (``fit``), cell (i, 1) the text.
    """
    n = len(images)
    if any(len(v) != n for v in generated.values()) or len(references) != n:
        raise ValueError(f"captions_picture: {n} images but captions "
                         f"{ {k: len(v) for k, v in generated.items()} } and {len(references)} "
                         "reference lists; give one of each per image")
    rows = []
    for i in range(n):
        parts = [(name, caps[i] or "(empty)") for name, caps in generated.items()]
        refs = list(references[i])[:max_references]
        parts += [("reference" if len(refs) == 1 else f"reference {j + 1}", r)
                  for j, r in enumerate(refs)]
        rows.append([fit(images[i]), text_block(parts)])
    return save(compose(rows), path)


def retrieval_picture(queries: Sequence[np.ndarray | str],
                      results: Sequence[Sequence[np.ndarray | str]],
                      correct: Sequence[Sequence[bool]], path: str | os.PathLike,
                      text_width: int = 170) -> Picture:
    """Each query with its top-k results in rank order, the correct ones framed green.

    queries: images (uint8 [H, W, C]) or captions (str); results[i]: query i's top-k, images or
    captions; correct[i][r]: whether result r is right. Row i: cell (i, 0) the query, cells
    (i, 1 + r) the results, each framed (``BORDER`` pixels, ``CORRECT`` or ``WRONG``).
    """
    if len(results) != len(queries) or len(correct) != len(queries) or any(
            len(r) != len(c) for r, c in zip(results, correct)):
        raise ValueError("retrieval_picture: give one list of results and one list of "
                         "correct flags, of equal length, per query")

    def block(x, width):
        return text_block([("", x)], width=width, max_lines=6) if isinstance(x, str) else fit(x)

    rows = []
    for q, res, ok in zip(queries, results, correct):
        rows.append([block(q, TEXT_WIDTH // 2)] + [
            framed(block(x, text_width), CORRECT if good else WRONG) for x, good in zip(res, ok)])
    return save(compose(rows), path)


def reconstructions_picture(originals: np.ndarray, reconstructions: Mapping[str, np.ndarray],
                            words: Sequence[str], path: str | os.PathLike,
                            min_side: int = MIN_SIDE) -> Picture:
    """Originals beside their reconstructions, each upsampled to >= ``min_side`` pixels by an
    integer factor (nearest neighbour), and the words each image became.

    originals: uint8 [n, H, W, C]; reconstructions: {title: uint8 [n, H, W, C]} (e.g. 'from the
    words', 'after the LM'); words: n strings. Row 0 holds the column titles; row 1 + i: cell
    (1 + i, 0) the original, (1 + i, 1 + j) reconstruction j, the last cell the words.
    """
    originals = np.asarray(originals)
    n = originals.shape[0]
    if any(np.shape(r) != originals.shape for r in reconstructions.values()) or len(words) != n:
        raise ValueError(f"reconstructions_picture: originals {originals.shape}, reconstructions "
                         f"{ {k: np.shape(v) for k, v in reconstructions.items()} }, {len(words)} "
                         "word strings; give arrays of one shape and one string per image")
    k = upsample_factor(originals.shape[1], originals.shape[2], min_side)
    tile_w = originals.shape[2] * k
    titles = ["original", *reconstructions, "words"]
    rows = [[text_block([("", t)], width=tile_w if i < len(titles) - 1 else TEXT_WIDTH,
                        max_lines=2) for i, t in enumerate(titles)]]
    for i in range(n):
        tiles = [originals[i], *(r[i] for r in reconstructions.values())]
        rows.append([fit(t, min_side=min_side, max_side=max(MAX_SIDE, tile_w)) for t in tiles]
                    + [text_block([("", words[i])], max_lines=8)])
    return save(compose(rows), path)
