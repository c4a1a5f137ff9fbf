"""Line charts drawn with Unicode braille (2x4 dots a cell), with numpy and no Textual.

Each series arrives as buckets (x, min, max, mean). A dot column takes the min-max span
of its buckets, so a spike one point wide still shows, and the span is stretched to meet
the neighbouring column so the line stays connected. A series drawn with a band fills
its min-max range as a dim background behind its mean line. The output is rows of Rich
segments; the chart widget turns them into Textual strips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from rich.segment import Segment
from rich.style import Style

# Braille dot bits for (dot row 0..3, dot column 0..1).
_DOT_BITS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], np.uint16)
_GLYPHS = [" "] + [chr(0x2800 + code) for code in range(1, 256)]
PALETTE = ("cyan", "magenta", "yellow", "green", "dodger_blue1", "red", "orange1", "bright_white",
           "spring_green2", "hot_pink", "gold1", "slate_blue1")
BAND_BACKGROUND = {"cyan": "#0b3a40", "magenta": "#3d1240", "yellow": "#3d3a10", "green": "#123d14",
                   "dodger_blue1": "#10284a", "red": "#451414", "orange1": "#45300f", "bright_white": "#303030"}
AXIS_STYLE = Style(color="grey58")
LABEL_WIDTH = 10


@dataclass(frozen=True)
class Line:
    """One series to draw: bucket centres x, their min/max, and the mean the line follows."""

    label: str
    color: str
    x: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    mid: np.ndarray
    band: bool = False
    faint: bool = False  # drawn dim, behind the others (raw points under a smoothed line)
    dashed: bool = False  # every other pair of dot columns left out: the second mark past 12 colours


def color_for(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def dashed_for(index: int) -> bool:
    """Series 13-24 reuse the palette with a dashed line (and legend mark), so no two look alike up to 24."""
    return (index // len(PALETTE)) % 2 == 1


def legend_mark(line: Line) -> str:
    return "┅" if line.dashed else "━"


def format_value(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e5:
        text = f"{value:.4g}"
    else:
        text = f"{value:.2e}"
    return text


def format_step(value: float) -> str:
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit * 10:
            return f"{value / limit:.4g}{suffix}"
    return f"{value:.0f}"


def format_elapsed(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def value_range(lines: list[Line]) -> tuple[float, float]:
    los = [float(np.min(lo)) for lo in (line.lo[np.isfinite(line.lo)] for line in lines) if len(lo)]
    his = [float(np.max(hi)) for hi in (line.hi[np.isfinite(line.hi)] for line in lines) if len(hi)]
    if not los:
        return 0.0, 1.0
    lo, hi = min(los), max(his)
    if lo == hi:
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def render(lines: list[Line], width: int, height: int, x_range: tuple[float, float],
           x_format: Callable[[float], str] = format_step,
           y_range: tuple[float, float] | None = None,
           y_format: Callable[[float], str] = format_value) -> list[list[Segment]]:
    """`height` rows of segments, each `width` cells: y labels, plot, x axis, x labels.

    Lines are drawn in order and a cell takes the colour of the last line that touches it,
    so callers put the line that matters most (a selected rank, a smoothed line) last.
    Points outside `x_range` are left out (zoomed in), values outside the y range are
    pinned to the edge (an outlier clipped by a robust range still shows where it is).
    """
    cols = max(1, width - LABEL_WIDTH - 1)
    rows = max(1, height - 2)
    y0, y1 = y_range or value_range(lines)
    x0, x1 = x_range
    if not (math.isfinite(x0) and math.isfinite(x1)) or x1 <= x0:
        x0, x1 = (x0 - 0.5, x0 + 0.5) if math.isfinite(x0) else (0.0, 1.0)
    dot_cols, dot_rows = cols * 2, rows * 4
    codes = np.zeros((rows, cols), np.uint16)
    owner = np.full((rows, cols), -1, np.int16)
    band_owner = np.full((rows, cols), -1, np.int16)

    def to_col(x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint((x - x0) / (x1 - x0) * (dot_cols - 1)), 0, dot_cols - 1).astype(np.int64)

    def to_row(y: np.ndarray) -> np.ndarray:
        return np.clip(np.rint((y1 - y) / (y1 - y0) * (dot_rows - 1)), 0, dot_rows - 1).astype(np.int64)

    dot_row_index = np.arange(dot_rows)[:, None]
    for index, line in enumerate(lines):
        inside = (line.x >= x0) & (line.x <= x1) & np.isfinite(line.mid)
        if not inside.all():
            line = Line(line.label, line.color, line.x[inside], line.lo[inside], line.hi[inside], line.mid[inside],
                        line.band, line.faint, line.dashed)
        if len(line.x) == 0:
            continue
        order = np.argsort(line.x, kind="stable")
        col = to_col(line.x[order])
        lo_row = to_row(line.hi[order])  # rows grow downwards: the max is the top
        hi_row = to_row(line.lo[order])
        mid = line.mid[order]
        first, last = int(col[0]), int(col[-1])
        span = np.arange(first, last + 1)
        top = np.full(len(span), dot_rows, np.int64)
        bottom = np.full(len(span), -1, np.int64)
        np.minimum.at(top, col - first, lo_row if not line.band else to_row(mid))
        np.maximum.at(bottom, col - first, hi_row if not line.band else to_row(mid))
        # Columns without a bucket follow the line between their neighbours.
        path = to_row(np.interp(span, col, mid))
        has = bottom >= 0
        top = np.where(has, top, path)
        bottom = np.where(has, bottom, path)
        if len(span) > 1:  # meet the previous column
            prev = path[:-1]
            top[1:] = np.minimum(top[1:], prev)
            bottom[1:] = np.maximum(bottom[1:], prev)
        dots = np.zeros((dot_rows, dot_cols), bool)
        dots[:, first:last + 1] = (dot_row_index >= top) & (dot_row_index <= bottom)
        if line.dashed:
            dots[:, (np.arange(dot_cols) // 2) % 2 == 1] = False
        cell = _cells(dots, rows, cols)
        codes |= cell
        owner[cell > 0] = index
        if line.band:
            band_dots = np.zeros((dot_rows, dot_cols), bool)
            band_top = np.full(len(span), dot_rows, np.int64)
            band_bottom = np.full(len(span), -1, np.int64)
            np.minimum.at(band_top, col - first, lo_row)
            np.maximum.at(band_bottom, col - first, hi_row)
            band_dots[:, first:last + 1] = (dot_row_index >= band_top) & (dot_row_index <= band_bottom)
            band_owner[_cells(band_dots, rows, cols) > 0] = index
    return _rows(lines, codes, owner, band_owner, rows, cols, (x0, x1), (y0, y1), x_format, y_format)


def _cells(dots: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Dot matrix (rows*4, cols*2) -> braille code per cell."""
    blocks = dots.reshape(rows, 4, cols, 2)
    return np.einsum("rycx,yx->rc", blocks.astype(np.uint16), _DOT_BITS)


def _rows(lines: list[Line], codes: np.ndarray, owner: np.ndarray, band_owner: np.ndarray, rows: int, cols: int,
          x_span: tuple[float, float], y_span: tuple[float, float], x_format: Callable[[float], str],
          y_format: Callable[[float], str] = format_value) -> list[list[Segment]]:
    y0, y1 = y_span
    styles = [Style(color=line.color, dim=line.faint) for line in lines]
    band_styles = [Style(bgcolor=BAND_BACKGROUND.get(line.color, "#303030")) for line in lines]
    band_line_styles = [Style(color=line.color, bgcolor=BAND_BACKGROUND.get(line.color, "#303030")) for line in lines]
    label_rows = {0: y1, rows - 1: y0}
    if rows >= 5:
        label_rows[(rows - 1) // 2] = y1 - (y1 - y0) * ((rows - 1) // 2) / (rows - 1)
    out: list[list[Segment]] = []
    for r in range(rows):
        label = y_format(label_rows[r]).rjust(LABEL_WIDTH)[-LABEL_WIDTH:] if r in label_rows else " " * LABEL_WIDTH
        segments = [Segment(label, AXIS_STYLE), Segment("┤" if r in label_rows else "│", AXIS_STYLE)]
        row_codes, row_owner, row_band = codes[r], owner[r], band_owner[r]
        start = 0
        for c in range(1, cols + 1):
            if c < cols and row_owner[c] == row_owner[start] and row_band[c] == row_band[start]:
                continue
            text = "".join(_GLYPHS[int(code)] for code in row_codes[start:c])
            o, b = int(row_owner[start]), int(row_band[start])
            if o >= 0 and b >= 0:
                style = band_line_styles[o] if lines[o].band and o == b else styles[o] + band_styles[b]
            elif o >= 0:
                style = styles[o]
            elif b >= 0:
                style = band_styles[b]
            else:
                style = None
            segments.append(Segment(text, style))
            start = c
        out.append(segments)
    out.append([Segment(" " * LABEL_WIDTH + "└" + "─" * cols, AXIS_STYLE)])
    out.append([Segment(" " * (LABEL_WIDTH + 1) + _x_labels(cols, x_span, x_format), AXIS_STYLE)])
    return out


def _x_labels(cols: int, x_span: tuple[float, float], x_format: Callable[[float], str]) -> str:
    x0, x1 = x_span
    left, right = x_format(x0), x_format(x1)
    line = [" "] * cols
    places = [(0, left), (cols - len(right), right)]
    if cols >= 30:
        middle = x_format((x0 + x1) / 2)
        places.append(((cols - len(middle)) // 2, middle))
    for at, text in places:
        for i, ch in enumerate(text):
            if 0 <= at + i < cols:
                line[at + i] = ch
    return "".join(line)
