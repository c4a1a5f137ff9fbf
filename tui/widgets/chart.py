"""MetricChart: one key's line chart, drawn with braille (widgets/braille.py), one row of title."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget

from ..data.series import X_TIME, Series
from .braille import LABEL_WIDTH, Line, color_for, format_elapsed, format_step, format_value, render

MEAN = "mean"
PER_RANK = "ranks"


def lines_for_run(series: Series, mode: str, first_color: int = 0, label: str = "") -> list[Line]:
    """One line per rank, or the mean over ranks with a min-max band."""
    buckets = series.buckets
    if len(buckets) == 0:
        return []
    centre = lambda b: (b.bucket.astype(np.float64) + 0.5) * b.width  # noqa: E731
    if mode == MEAN:
        folded = buckets.across_ranks()
        return [Line(label or MEAN, color_for(first_color), centre(folded), folded.lo, folded.hi, folded.mean, band=True)]
    lines = []
    for i, rank in enumerate(buckets.ranks()):
        one = buckets.of_rank(rank)
        name = f"{label} r{rank}" if label else f"r{rank}"
        lines.append(Line(name, color_for(first_color + i), centre(one), one.lo, one.hi, one.mean))
    return lines


def x_formatter(xkind: str, x_start: float) -> Callable[[float], str]:
    if xkind == X_TIME:
        return lambda v: format_elapsed((v - x_start) / 1e6)
    return format_step


class MetricChart(Widget):
    """A title row (key, latest value, points, legend) over a braille line chart."""

    DEFAULT_CSS = """
    MetricChart { height: 1fr; min-height: 8; }
    """

    def __init__(self, key: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.key = key
        self.lines: list[Line] = []
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
        """Buckets to ask the data layer for: two per braille dot column."""
        width = self.size.width or (self.app.size.width - 30)
        return max(16, 2 * 2 * max(1, width - LABEL_WIDTH - 1))

    def show(self, title: Text, lines: list[Line], x_range: tuple[float, float], x_format: Callable[[float], str],
             message: str = "") -> None:
        self.title, self.lines, self.x_range, self.x_format = title, lines, x_range, x_format
        self.message = message if not lines else ""
        self._strips = None
        self.updates += 1
        if self.first_data_at is None and lines:
            self.first_data_at = time.monotonic()
        self.refresh()

    def render_line(self, y: int) -> Strip:
        width, height = self.size
        if self._strips is None or self._strips_size != (width, height):
            self._strips = self._build(width, height)
            self._strips_size = (width, height)
        return self._strips[y] if y < len(self._strips) else Strip.blank(width)

    def _build(self, width: int, height: int) -> list[Strip]:
        title = self.title.copy()
        title.truncate(width)
        strips = [Strip(list(title.render(self.app.console)), title.cell_len).adjust_cell_length(width)]
        if height < 4:
            return strips
        if not self.lines:
            note = Segment(f"  {self.message or 'no points'}", Style(dim=True))
            return strips + [Strip([note]).adjust_cell_length(width)] + [Strip.blank(width)] * (height - 2)
        for row in render(self.lines, width, height - 1, self.x_range, self.x_format):
            strips.append(Strip(row).adjust_cell_length(width))
        if self.first_drawn_at is None:
            self.first_drawn_at = time.monotonic()
        return strips


def default_target(width: int) -> int:
    """Buckets for charts not laid out yet, from the terminal's width less the key picker and labels."""
    return max(16, 4 * (width - 42))


def chart_request(screen: Widget, chosen: list[str] | None, xkind: str) -> tuple:
    """What a chart screen asks its reader for: (keys, or None for the defaults; x kind; buckets)."""
    charts = list(screen.query(MetricChart))
    target = charts[0].target_buckets if charts else default_target(screen.app.size.width)
    return (tuple(chosen) if chosen is not None else None, xkind, target)


def sync_charts(area: Widget, keys: list[str]) -> None:
    """One MetricChart per key in `area`, in the order given."""
    existing = {chart.key: chart for chart in area.query(MetricChart)}
    for key, chart in existing.items():
        if key not in keys:
            chart.remove()
    for key in keys:
        if key not in existing:
            area.mount(MetricChart(key))


def chart_title(key: str, series: list[Series], lines: list[Line], extra: str = "") -> Text:
    """`key  last 0.123 @ 4,000  12.3k pts  ━ r0 ━ r1`."""
    text = Text(key, style="bold")
    points = sum(s.points for s in series)
    last = [s for s in series if s.last_value is not None]
    if len(series) == 1 and last:
        s = last[0]
        where = format_step(s.last_x) if s.xkind != X_TIME or s.last_x is None else "end"
        text.append(f"  last {format_value(s.last_value)}", style="bold")
        if s.xkind != X_TIME:
            text.append(f" @ step {where}")
    text.append(f"  {format_step(points)} pts", style="dim")
    nonfinite = sum(s.nonfinite for s in series)
    if nonfinite:
        text.append(f"  {nonfinite} non-finite", style="bold red")
    if extra:
        text.append(f"  {extra}", style="dim")
    for line in lines[:12]:
        text.append("  ━ ", style=line.color)
        text.append(line.label)
    return text
