"""MetricChart: one key's line chart, drawn with braille (widgets/braille.py), one row of title."""

from __future__ import annotations

import time
import warnings
from typing import Callable

import numpy as np
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.strip import Strip
from textual import events
from textual.message import Message
from textual.widget import Widget

from ..data.series import X_TIME, Series
from .braille import (
    LABEL_WIDTH, Line, color_for, dashed_for, format_elapsed, format_step, format_value, legend_mark, render,
)
from .chart_view import ChartView, format_log_value, prepare, y_range

MEAN = "mean"
MEDIAN = "median"  # median over ranks, min-max band, the slowest rank on its own
PER_RANK = "ranks"
MODES = (MEDIAN, PER_RANK, MEAN)
SLOWEST_COLOR = "red"
MAX_TARGET = 1 << 16  # buckets asked for when zoomed in


def _centre(b) -> np.ndarray:
    return (b.bucket.astype(np.float64) + 0.5) * b.width


def lines_for_run(series: Series, mode: str, first_color: int = 0, label: str = "") -> list[Line]:
    """One line per rank; the mean over ranks with a min-max band; or the median with the
    band and the slowest rank (the one that got least far along x) drawn on its own."""
    buckets = series.buckets
    if len(buckets) == 0:
        return []
    ranks = buckets.ranks()
    if mode == MEAN or (mode == MEDIAN and len(ranks) == 1 and label):
        folded = buckets.across_ranks()
        return [Line(label or MEAN, color_for(first_color), _centre(folded), folded.lo, folded.hi, folded.mean,
                     band=True, dashed=dashed_for(first_color))]
    if mode == MEDIAN and len(ranks) > 1:
        return _median_lines(series, ranks, first_color, label)
    lines = []
    for i, rank in enumerate(ranks):
        one = buckets.of_rank(rank)
        name = f"{label} r{rank}" if label else f"r{rank}"
        lines.append(Line(name, color_for(first_color + i), _centre(one), one.lo, one.hi, one.mean,
                          dashed=dashed_for(first_color + i)))
    return lines


def _median_lines(series: Series, ranks: list[int], first_color: int, label: str) -> list[Line]:
    buckets = series.buckets
    folded = buckets.across_ranks()
    grid = np.full((len(ranks), len(folded)), np.nan)
    where = np.searchsorted(folded.bucket, buckets.bucket)
    grid[np.searchsorted(ranks, buckets.rank), where] = buckets.mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a bucket no rank has is NaN, and stays so
        median = np.nanmedian(grid, axis=0)
    name = f"{label} median" if label else MEDIAN
    lines = [Line(name, color_for(first_color), _centre(folded), folded.lo, folded.hi, median, band=True)]
    reach = {rank: int(buckets.bucket[buckets.rank == rank].max()) for rank in ranks}
    slowest = min(reach, key=lambda r: (reach[r], -r))
    if reach[slowest] < max(reach.values()):  # someone is behind: show where it stopped
        one = buckets.of_rank(slowest)
        tag = f"r{slowest} slowest"
        lines.append(Line(f"{label} {tag}" if label else tag, SLOWEST_COLOR, _centre(one), one.lo, one.hi, one.mean))
    return lines


def x_formatter(xkind: str, x_start: float) -> Callable[[float], str]:
    if xkind == X_TIME:
        return lambda v: format_elapsed((v - x_start) / 1e6)
    return format_step


class MetricChart(Widget):
    """A title row (key, latest value, points, legend) over a braille line chart.

    The screen hands it lines for the whole x range and its ChartView; the chart applies
    the view (x window, smoothing, log y, robust range, hidden/solo/selected) when drawing.
    The mouse wheel zooms around the pointer and a click on a legend entry selects it:
    both are messages to the screen, which owns the view.
    """

    DEFAULT_CSS = """
    MetricChart { height: 1fr; min-height: 8; }
    """

    class Zoom(Message):
        def __init__(self, factor: float, centre: float) -> None:
            super().__init__()
            self.factor, self.centre = factor, centre

    class LegendClicked(Message):
        def __init__(self, label: str) -> None:
            super().__init__()
            self.label = label

    def __init__(self, key: str, *, view: ChartView | None = None, id: str | None = None) -> None:
        super().__init__(id=id)
        self.key = key
        self.view = view or ChartView()
        self.lines: list[Line] = []
        self.drawn: list[Line] = []  # what the last drawing showed, after the view
        self.title = Text(key, style="bold")
        self.x_range: tuple[float, float] = (0.0, 1.0)
        self.x_format: Callable[[float], str] = format_step
        self.message = "loading…"
        self._strips: list[Strip] | None = None
        self._strips_size = (0, 0)
        self.updates = 0  # how many times data arrived: tests wait on it
        self.first_data_at: float | None = None  # monotonic time lines first arrived
        self.first_drawn_at: float | None = None  # monotonic time lines were first drawn (the benchmark reads it)

    @property
    def target_buckets(self) -> int:
        """Buckets to ask the data layer for: two per braille dot column, more when zoomed in."""
        width = self.size.width or (self.app.size.width - 30)
        return min(MAX_TARGET, int(max(16, 2 * 2 * max(1, width - LABEL_WIDTH - 1)) * self.view.zoom))

    def show(self, title: Text, lines: list[Line], x_range: tuple[float, float], x_format: Callable[[float], str],
             message: str = "") -> None:
        self.title, self.lines, self.x_range, self.x_format = title, lines, x_range, x_format
        self.message = message if not lines else ""
        self._strips = None
        self.updates += 1
        if self.first_data_at is None and lines:
            self.first_data_at = time.monotonic()
        self.refresh()

    def redraw(self) -> None:
        """The view changed: draw the same lines again."""
        self._strips = None
        self.refresh()

    def render_line(self, y: int) -> Strip:
        width, height = self.size
        if self._strips is None or self._strips_size != (width, height):
            self._strips = self._build(width, height)
            self._strips_size = (width, height)
        return self._strips[y] if y < len(self._strips) else Strip.blank(width)

    def _legend(self, drawn: list[Line]) -> Text:
        title = self.title.copy()
        self._legend_spans: list[tuple[int, int, str]] = []
        seen: set[str] = set()
        for line in self.lines:
            if line.label in seen:
                continue
            seen.add(line.label)
            off = line.label in self.view.hidden or (self.view.solo is not None and line.label != self.view.solo)
            title.append("  ")
            start = title.cell_len
            title.append(f"{legend_mark(line)} ", style="dim" if off else line.color)
            style = "reverse" if line.label == self.view.selected else ("dim strike" if off else "")
            title.append(line.label, style=style)
            self._legend_spans.append((start, title.cell_len, line.label))
        return title

    def _build(self, width: int, height: int) -> list[Strip]:
        lines = prepare(self.view, self.lines)
        self.drawn = lines
        title = self._legend(lines)
        title.truncate(width)
        strips = [Strip(list(title.render(self.app.console)), title.cell_len).adjust_cell_length(width)]
        if height < 4:
            return strips
        if not lines:
            note = Segment(f"  {self.message or ('all series hidden (a: show all)' if self.lines else 'no points')}",
                           Style(dim=True))
            return strips + [Strip([note]).adjust_cell_length(width)] + [Strip.blank(width)] * (height - 2)
        x_range = self.view.visible_x(self.x_range)
        y_format = format_log_value if self.view.log_y else format_value
        for row in render(lines, width, height - 1, x_range, self.x_format, y_range(self.view, lines, x_range),
                          y_format):
            strips.append(Strip(row).adjust_cell_length(width))
        if self.first_drawn_at is None:
            self.first_drawn_at = time.monotonic()
        return strips

    # --- mouse ----------------------------------------------------------------------------
    def _x_fraction(self, x: int) -> float:
        cols = max(1, self.size.width - LABEL_WIDTH - 1)
        at = min(1.0, max(0.0, (x - LABEL_WIDTH - 1) / cols))
        f0, f1 = self.view.x_window
        return f0 + at * (f1 - f0)

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.stop()
        self.post_message(self.Zoom(1.5, self._x_fraction(event.x)))

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.stop()
        self.post_message(self.Zoom(1 / 1.5, self._x_fraction(event.x)))

    def on_click(self, event: events.Click) -> None:
        if event.y != 0:
            return
        for start, end, label in getattr(self, "_legend_spans", []):
            if start <= event.x < end:
                event.stop()
                self.post_message(self.LegendClicked(label))
                return


def default_target(width: int) -> int:
    """Buckets for charts not laid out yet, from the terminal's width less the key picker and labels."""
    return max(16, 4 * (width - 42))


def chart_request(screen: Widget, chosen: list[str] | None, xkind: str, zoom: float = 1.0) -> tuple:
    """What a chart screen asks its reader for: (keys, or None for the defaults; x kind; buckets)."""
    charts = list(screen.query(MetricChart))
    target = charts[0].target_buckets if charts else min(MAX_TARGET, int(default_target(screen.app.size.width) * zoom))
    return (tuple(chosen) if chosen is not None else None, xkind, target)


def chart_title(key: str, series: list[Series], lines: list[Line], extra: str = "", rank: int | None = None) -> Text:
    """`key  last 0.123 @ step 4,000  12.3k pts` (the legend is added when drawn).

    The last value is the one at the highest step: the mean over the ranks that reached
    it, or the given rank's own latest point.
    """
    text = Text(key, style="bold")
    points = sum(s.points for s in series)
    last = [s for s in series if s.last_value is not None]
    if len(series) == 1 and last:
        s = last[0]
        value, x = s.last_value, s.last_x
        own = (s.last_by_rank or {}).get(rank) if rank is not None else None
        if own is not None:
            x, value = own
        where = format_step(x) if s.xkind != X_TIME or x is None else "end"
        text.append(f"  last {format_value(value)}", style="bold")
        if s.xkind != X_TIME:
            text.append(f" @ step {where}")
        if own is not None:
            text.append(f" (r{rank})")
    text.append(f"  {format_step(points)} pts", style="dim")
    nonfinite = sum(s.nonfinite for s in series)
    if nonfinite:
        text.append(f"  {nonfinite} non-finite", style="bold red")
    if extra:
        text.append(f"  {extra}", style="dim")
    return text
