"""ChartView: the toggles a user sets on a screen's charts, and how they turn series into lines.

One ChartView per screen (Run, Compare) is shared by all its charts: smoothing, log y,
robust y range, the x window (zoom and pan), which series are hidden, soloed or selected,
and the layout (charts per row). It is plain data with pure functions beside it, no
Textual: the screens apply keys to it and the chart widget draws what `prepare` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .braille import Line, format_value

SMOOTHING_STEPS = (0.0, 0.6, 0.8, 0.9, 0.95, 0.99)  # `s` cycles through these EMA weights
MAX_ZOOM = 256.0  # how far in `+` and the mouse wheel go (the window is 1/256 of the x range)
ROBUST_QUANTILES = (1.0, 99.0)  # a line's core range, robust to a few spikes
ROBUST_MARGIN = 0.5  # values up to this many core spans beyond it still count (a loss's first steps)
ROBUST_FENCE = 3.0  # a line whose range lies this many typical spans beyond the others is left out of the y range


@dataclass
class ChartView:
    """What the user chose for the charts of one screen; persisted per experiment (data/view_state.py)."""

    smoothing: float = 0.0  # EMA weight, 0 = off
    log_y: bool = False
    robust: bool = False
    columns: int = 0  # charts per row; 0 = as many as fit
    x_window: tuple[float, float] = (0.0, 1.0)  # visible fraction of the x range
    hidden: set[str] = field(default_factory=set)  # series labels not drawn
    solo: str | None = None  # only this series drawn
    selected: str | None = None  # drawn on top, marked in the legend

    # --- zoom and pan ----------------------------------------------------------------------
    @property
    def zoom(self) -> float:
        return 1.0 / max(1e-9, self.x_window[1] - self.x_window[0])

    def zoom_by(self, factor: float, centre: float | None = None) -> None:
        """Zoom in (factor > 1) or out around `centre` (a fraction of the full x range; default the middle)."""
        lo, hi = self.x_window
        span = hi - lo
        centre = (lo + hi) / 2 if centre is None else centre
        new_span = min(1.0, max(1.0 / MAX_ZOOM, span / factor))
        at = (centre - lo) / span if span else 0.5
        lo = centre - at * new_span
        self.x_window = _clamp(lo, new_span)

    def pan(self, fraction: float) -> None:
        """Move the window by `fraction` of its own width (negative: left)."""
        lo, hi = self.x_window
        self.x_window = _clamp(lo + fraction * (hi - lo), hi - lo)

    def reset_zoom(self) -> None:
        self.x_window = (0.0, 1.0)

    def visible_x(self, x_range: tuple[float, float]) -> tuple[float, float]:
        lo, hi = x_range
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
            return x_range
        f0, f1 = self.x_window
        return lo + f0 * (hi - lo), lo + f1 * (hi - lo)

    # --- series ------------------------------------------------------------------------------
    def cycle_smoothing(self) -> None:
        at = min(range(len(SMOOTHING_STEPS)), key=lambda i: abs(SMOOTHING_STEPS[i] - self.smoothing))
        self.smoothing = SMOOTHING_STEPS[(at + 1) % len(SMOOTHING_STEPS)]

    def select_next(self, labels: list[str], step: int = 1) -> None:
        """Move the selection through `labels` (None, then each label in turn)."""
        order: list[str | None] = [None, *labels]
        at = order.index(self.selected) if self.selected in order else 0
        self.selected = order[(at + step) % len(order)]

    def toggle_hidden(self) -> None:
        if self.selected is not None:
            self.hidden ^= {self.selected}

    def toggle_solo(self) -> None:
        self.solo = None if self.solo == self.selected else self.selected

    def show_all(self) -> None:
        self.hidden.clear()
        self.solo = None

    def status(self) -> str:
        """A short line for the screen header: the toggles that are not at their defaults."""
        parts = []
        if self.smoothing:
            parts.append(f"smooth {self.smoothing:g}")
        if self.log_y:
            parts.append("log y")
        if self.robust:
            parts.append("robust y")
        if self.x_window != (0.0, 1.0):
            parts.append(f"zoom {self.zoom:.3g}x")
        if self.solo:
            parts.append(f"solo {self.solo}")
        elif self.hidden:
            parts.append(f"{len(self.hidden)} hidden")
        if self.selected:
            parts.append(f"selected {self.selected}")
        return "  ".join(parts)


def _clamp(lo: float, span: float) -> tuple[float, float]:
    lo = min(max(0.0, lo), 1.0 - span)
    return (lo, lo + span)


_EMA_BLOCK = 64


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average, debiased at the start (as TensorBoard and W&B smooth).

    Vectorized in blocks of 64: within a block the average is a small triangular matrix
    product, and the running state carries from block to block (a zoomed chart can hold
    65k buckets per line; a Python loop over them would stall the UI).
    """
    if weight <= 0 or len(values) == 0:
        return values
    t = np.arange(_EMA_BLOCK)
    lower = np.tril(weight ** np.clip(t[:, None] - t[None, :], 0, None))
    decay = weight ** (t + 1)
    out = np.empty(len(values))
    state = 0.0
    for start in range(0, len(values), _EMA_BLOCK):
        x = values[start:start + _EMA_BLOCK]
        m = len(x)
        block = (1 - weight) * (lower[:m, :m] @ x) + decay[:m] * state
        out[start:start + m] = block
        state = float(block[-1])
    return out / (1 - weight ** (np.arange(len(values)) + 1.0))


def _log(line: Line) -> Line:
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = np.where(line.lo > 0, np.log10(np.where(line.lo > 0, line.lo, 1.0)), np.nan)
        hi = np.where(line.hi > 0, np.log10(np.where(line.hi > 0, line.hi, 1.0)), np.nan)
        mid = np.where(line.mid > 0, np.log10(np.where(line.mid > 0, line.mid, 1.0)), np.nan)
    lo = np.where(np.isnan(lo), mid, lo)  # a min <= 0 under a positive mean: the band stops at the line
    return Line(line.label, line.color, line.x, lo, np.where(np.isnan(hi), mid, hi), mid, line.band, line.faint,
                line.dashed)


def format_log_value(value: float) -> str:
    """A y label on a log axis: the value, not its logarithm."""
    return format_value(10.0 ** value) if math.isfinite(value) else ""


def prepare(view: ChartView, lines: list[Line]) -> list[Line]:
    """Lines to draw, in drawing order: hidden ones out, log y, smoothing (raw drawn faint
    behind), the selected series last so it is on top."""
    shown = [line for line in lines if (view.solo is None or line.label == view.solo) and line.label not in view.hidden]
    if view.log_y:
        shown = [_log(line) for line in shown]
    out: list[Line] = []
    if view.smoothing:
        for line in shown:
            out.append(Line(line.label, line.color, line.x, line.lo, line.hi, line.mid, False, True, line.dashed))
        for line in shown:
            order = np.argsort(line.x, kind="stable")
            smooth = np.empty_like(line.mid)
            finite = np.isfinite(line.mid[order])
            smooth[order] = np.nan
            smooth[order[finite]] = ema(line.mid[order][finite], view.smoothing)
            out.append(Line(line.label, line.color, line.x, smooth, smooth, smooth, False, False, line.dashed))
    else:
        out = shown
    if view.selected is not None:
        out = [line for line in out if line.label != view.selected] + [line for line in out if line.label == view.selected]
    return out


def y_range(view: ChartView, lines: list[Line], x_range: tuple[float, float]) -> tuple[float, float] | None:
    """The y range for the visible part of `lines`: None (the plain min..max) unless robust is on.

    Robust: each line's 1st..99th percentile, widened by half that span where the line goes
    there (a loss's first steps stay in view, a spike 1000x the rest does not); a line far
    outside the others (a diverged run) is left out, so it is pinned to the edge instead of
    squeezing the rest into one row.
    """
    if not view.robust:
        return _plain_range(lines, x_range)
    ranges = []
    for line in lines:
        if line.faint:
            continue
        values = line.mid[(line.x >= x_range[0]) & (line.x <= x_range[1]) & np.isfinite(line.mid)]
        if len(values):
            lo, hi = (float(v) for v in np.percentile(values, ROBUST_QUANTILES))
            margin = ROBUST_MARGIN * max(hi - lo, 0.1 * max(abs(lo), abs(hi)), 1e-12)
            ranges.append((max(float(values.min()), lo - margin), min(float(values.max()), hi + margin)))
    if not ranges:
        return None
    lows = sorted(r[0] for r in ranges)
    highs = sorted(r[1] for r in ranges)
    typical_lo, typical_hi = float(np.median(lows)), float(np.median(highs))
    span = max(typical_hi - typical_lo, abs(typical_hi) * 1e-6, 1e-12)
    lo = min(v for v in lows if v >= typical_lo - ROBUST_FENCE * span)
    hi = max(v for v in highs if v <= typical_hi + ROBUST_FENCE * span)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return lo - pad, hi + pad


def _plain_range(lines: list[Line], x_range: tuple[float, float]) -> tuple[float, float] | None:
    """min..max of what is inside the x window (None: let the renderer decide)."""
    los, his = [], []
    for line in lines:
        inside = (line.x >= x_range[0]) & (line.x <= x_range[1])
        lo, hi = line.lo[inside], line.hi[inside]
        lo, hi = lo[np.isfinite(lo)], hi[np.isfinite(hi)]
        if len(lo) and len(hi):
            los.append(float(lo.min()))
            his.append(float(hi.max()))
    if not los:
        return None
    lo, hi = min(los), max(his)
    if lo == hi:
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    return lo, hi
