"""A bar chart with confidence-interval error bars, drawn with PIL (matplotlib is not a
dependency): one panel per metric, one bar per variant, a dashed line at the chance level."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from lqae_vlap.core import files

# One colour per bar (variant), in order; more variants cycle.
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
INK, GRID, CHANCE = (20, 20, 20), (225, 225, 225), (120, 120, 120)
PANEL_W, PANEL_H, MARGIN = 260, 220, 36


def _font(size: int):
    from PIL import ImageFont  # noqa: PLC0415

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def _panel(title: str, labels: Sequence[str], means: Sequence[float],
           halfwidths: Sequence[float], chance: float | None) -> np.ndarray:
    """One metric: uint8 [PANEL_H, PANEL_W, 3]. NaN means draw no bar; NaN half-widths no bar."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    image = Image.new("RGB", (PANEL_W, PANEL_H), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, small = _font(13), _font(11)
    draw.text((8, 4), title, fill=INK, font=font)
    vals = [m for m in means if math.isfinite(m)]
    tops = [m + (h if math.isfinite(h) else 0.0) for m, h in zip(means, halfwidths)
            if math.isfinite(m)]
    lows = [m - (h if math.isfinite(h) else 0.0) for m, h in zip(means, halfwidths)
            if math.isfinite(m)]
    if chance is not None and math.isfinite(chance):
        tops.append(chance)
        lows.append(chance)
    lo = min([0.0, *lows]) if vals else 0.0
    hi = max([*tops, lo + 1e-9]) if vals else 1.0
    hi += 0.08 * (hi - lo)
    left, right, top, bottom = MARGIN + 8, PANEL_W - 10, 26, PANEL_H - 30

    def y(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        draw.line([(left, y(v)), (right, y(v))], fill=GRID)
        draw.text((2, y(v) - 6), f"{v:.3g}", fill=INK, font=small)
    n = max(len(means), 1)
    slot = (right - left) / n
    for i, (m, h) in enumerate(zip(means, halfwidths)):
        x0, x1 = left + i * slot + 0.18 * slot, left + (i + 1) * slot - 0.18 * slot
        if math.isfinite(m):
            draw.rectangle([x0, min(y(m), y(0.0 if lo <= 0 else lo)),
                            x1, max(y(m), y(0.0 if lo <= 0 else lo))],
                           fill=COLOURS[i % len(COLOURS)])
            if math.isfinite(h):
                xc = (x0 + x1) / 2
                draw.line([(xc, y(m - h)), (xc, y(m + h))], fill=INK, width=2)
                for v in (m - h, m + h):
                    draw.line([(xc - 6, y(v)), (xc + 6, y(v))], fill=INK, width=2)
        else:
            draw.text((x0, bottom - 14), "n/a", fill=CHANCE, font=small)
        draw.text((x0, bottom + 4), labels[i][:12], fill=INK, font=small)
    if chance is not None and math.isfinite(chance):
        for x in range(int(left), int(right), 8):
            draw.line([(x, y(chance)), (x + 4, y(chance))], fill=CHANCE, width=1)
    return np.asarray(image)


def bar_chart(path: str, labels: Sequence[str], panels: Sequence[dict], columns: int = 4,
              note: str = "") -> np.ndarray:
    """Writes a PNG of one panel per entry of ``panels`` and returns its pixels [H, W, 3] uint8.

    labels: the bar (variant) names. panels: dicts with 'title', 'means' and 'halfwidths' (one per
    label; NaN = no bar / no error bar) and optional 'chance' (a dashed line). note: a line of
    text under the panels.
    """
    from PIL import Image, ImageDraw  # noqa: PLC0415

    if not panels:
        raise ValueError("bar_chart needs at least one panel")
    for p in panels:
        if len(p["means"]) != len(labels) or len(p["halfwidths"]) != len(labels):
            raise ValueError(f"bar_chart: panel {p['title']!r} has {len(p['means'])} means and "
                             f"{len(p['halfwidths'])} half-widths for {len(labels)} labels")
    tiles = [_panel(p["title"], labels, [float(v) for v in p["means"]],
                    [float(v) for v in p["halfwidths"]], p.get("chance")) for p in panels]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    legend_h, note_h = 22, 20 if note else 0
    canvas = np.full((legend_h + rows * PANEL_H + note_h, columns * PANEL_W, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[legend_h + r * PANEL_H:legend_h + (r + 1) * PANEL_H,
               c * PANEL_W:(c + 1) * PANEL_W] = tile
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    x = 8
    for i, label in enumerate(labels):
        draw.rectangle([x, 6, x + 12, 18], fill=COLOURS[i % len(COLOURS)])
        draw.text((x + 16, 5), label, fill=INK, font=_font(12))
        x += 24 + 8 * len(label)
    if note:
        draw.text((8, legend_h + rows * PANEL_H + 3), note, fill=INK, font=_font(11))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    files.write_bytes(path, buffer.getvalue())
    return np.asarray(image)
