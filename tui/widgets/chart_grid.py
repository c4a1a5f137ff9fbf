"""ChartGrid: the chosen keys' charts in a grid sized to the space it has, a page at a time.

As many charts per row as fit at MIN_WIDTH cells (or the user's fixed number of columns),
as many rows as fit at MIN_HEIGHT; more keys than one page holds go on further pages
(`]` / `[`). Only the charts of the page shown exist, so a run with 50 keys chosen
draws (and reads) no more than a screenful at once.
"""

from __future__ import annotations

import math

from textual import events
from textual.containers import Container
from textual.message import Message

from .chart import MetricChart
from .chart_view import ChartView

MIN_WIDTH = 56  # cells a chart needs to be readable (labels + ~45 braille columns)
MIN_HEIGHT = 10  # rows: title, ~7 plot rows, x axis and labels


class ChartGrid(Container):
    DEFAULT_CSS = """
    ChartGrid { layout: grid; grid-gutter: 0 1; height: 1fr; }
    """

    class Laid(Message):
        """Charts were added (a resize, a page, new keys): the screen fills them with what it holds."""

    can_focus = True  # the screen's keys reach it first: not a filter box that would swallow them

    def __init__(self, view: ChartView, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.view = view
        self.keys: list[str] = []
        self.page = 0
        self._shape = (0, 0)

    # --- layout ---------------------------------------------------------------------------
    def shape(self) -> tuple[int, int]:
        """(columns, rows) of one page for the current size and number of keys."""
        width = self.size.width or max(1, self.app.size.width - 30)
        height = self.size.height or max(1, self.app.size.height - 6)
        n = max(1, len(self.keys))
        cols = self.view.columns or max(1, width // MIN_WIDTH)
        cols = max(1, min(cols, n))
        rows = max(1, min(height // MIN_HEIGHT, math.ceil(n / cols)))
        return cols, rows

    @property
    def per_page(self) -> int:
        cols, rows = self.shape()
        return cols * rows

    @property
    def pages(self) -> int:
        return max(1, math.ceil(len(self.keys) / self.per_page))

    def page_keys(self) -> list[str]:
        size = self.per_page
        self.page = min(self.page, self.pages - 1)
        return self.keys[self.page * size:(self.page + 1) * size]

    def set_keys(self, keys: list[str]) -> None:
        self.keys = list(keys)
        self.sync()

    def turn(self, step: int) -> None:
        self.page = (self.page + step) % self.pages
        self.sync()

    def sync(self) -> None:
        """Mount the charts of the current page (in order), remove the others, set the grid's shape."""
        cols, rows = self.shape()
        self.styles.grid_size_columns = cols
        self.styles.grid_size_rows = rows
        self._shape = (cols, rows)
        wanted = self.page_keys()
        existing = list(self.query(MetricChart))
        if [c.key for c in existing] == wanted:
            return
        for chart in existing:
            chart.remove()
        if wanted:
            self.mount_all([MetricChart(key, view=self.view) for key in wanted])
            self.post_message(self.Laid())

    def on_resize(self, event: events.Resize) -> None:
        if self.shape() != self._shape:
            self.sync()

    def label(self) -> str:
        return f"page {self.page + 1}/{self.pages}" if self.pages > 1 else ""
