"""The chart keys the Run and Compare screens share: smoothing, log y, robust range, zoom
and pan, pages and columns of the grid, selecting, hiding and soloing a series.

A mixin over a screen that has `view` (ChartView), `grid` (ChartGrid), `_draw()`,
`poll()` and `_remember()`; its bindings are spliced into each screen's BINDINGS,
and its message handlers go by name (Textual finds `on_*` methods of mixins, not `@on`).
"""

from __future__ import annotations

from typing import Callable

from textual.binding import Binding

from ..widgets.chart import MetricChart
from ..widgets.chart_grid import ChartGrid
from ..widgets.chart_view import ChartView

ZOOM_STEP = 2.0
PAN_STEP = 0.25  # of the window's width
MAX_COLUMNS = 4

CHART_BINDINGS = [
    Binding("s", "smooth", "Smoothing"),
    Binding("l", "log_y", "Log y"),
    Binding("r", "robust", "Robust y"),
    Binding("plus,equals_sign", "zoom(2.0)", "Zoom in", show=False),
    Binding("minus", "zoom(0.5)", "Zoom out", show=False),
    Binding("less_than_sign,comma", "pan(-1)", "Pan left", show=False),
    Binding("greater_than_sign,full_stop", "pan(1)", "Pan right", show=False),
    Binding("0", "reset_zoom", "Reset zoom", show=False),
    Binding("right_square_bracket", "page(1)", "Next page", show=False),
    Binding("left_square_bracket", "page(-1)", "Previous page", show=False),
    Binding("g", "columns", "Grid columns", show=False),
    Binding("n", "select(1)", "Select next series", show=False),
    Binding("N", "select(-1)", "Select previous series", show=False),
    Binding("h", "hide", "Hide selected", show=False),
    Binding("o", "solo", "Solo selected", show=False),
    Binding("a", "show_all", "Show all series", show=False),
]


class ChartTools:
    view: ChartView
    grid: ChartGrid

    def _labels(self) -> list[str]:
        """Series labels of the charts shown, in legend order (what n/N cycle through)."""
        seen: list[str] = []
        for chart in self.query(MetricChart):  # type: ignore[attr-defined]
            for line in chart.lines:
                if line.label not in seen:
                    seen.append(line.label)
        return seen

    def _view_changed(self, reread: bool = False, remember: bool = False) -> None:
        for chart in self.query(MetricChart):  # type: ignore[attr-defined]
            chart.redraw()
        self._draw()  # type: ignore[attr-defined]  # titles follow the selection
        self._show_header()  # type: ignore[attr-defined]
        if remember:
            self._remember()  # type: ignore[attr-defined]
        if reread:
            self.poll()  # type: ignore[attr-defined]

    def action_smooth(self) -> None:
        self.view.cycle_smoothing()
        self._view_changed(remember=True)

    def action_log_y(self) -> None:
        self.view.log_y = not self.view.log_y
        self._view_changed(remember=True)

    def action_robust(self) -> None:
        self.view.robust = not self.view.robust
        self._view_changed(remember=True)

    def action_zoom(self, factor: float) -> None:
        self.view.zoom_by(factor)
        self._view_changed(reread=True)

    def action_pan(self, direction: int) -> None:
        self.view.pan(direction * PAN_STEP)
        self._view_changed()

    def action_reset_zoom(self) -> None:
        self.view.reset_zoom()
        self._view_changed(reread=True)

    def action_page(self, step: int) -> None:
        self.grid.turn(step)
        self._draw()  # type: ignore[attr-defined]
        self._show_header()  # type: ignore[attr-defined]

    def action_columns(self) -> None:
        self.view.columns = (self.view.columns + 1) % (MAX_COLUMNS + 1)
        self.grid.sync()
        self._draw()  # type: ignore[attr-defined]
        self._view_changed(remember=True)
        notify = getattr(self, "notify")
        notify(f"{self.view.columns} charts per row" if self.view.columns else "as many charts per row as fit",
               timeout=2)

    def action_select(self, step: int) -> None:
        self.view.select_next(self._labels(), step)
        self._view_changed()

    def action_hide(self) -> None:
        self._on_selected(self.view.toggle_hidden)

    def action_solo(self) -> None:
        self._on_selected(self.view.toggle_solo)

    def _on_selected(self, change: Callable[[], None]) -> None:
        """Apply `change` to the selected series, or say how to select one."""
        if self.view.selected is None:
            getattr(self, "notify")("select a series first (n)", severity="warning", timeout=2)
            return
        change()
        self._view_changed()

    def action_show_all(self) -> None:
        self.view.show_all()
        self._view_changed()

    def on_chart_grid_laid(self, event: ChartGrid.Laid) -> None:
        self._draw()  # type: ignore[attr-defined]
        self._show_header()  # type: ignore[attr-defined]

    def on_metric_chart_zoom(self, event: MetricChart.Zoom) -> None:
        self.view.zoom_by(event.factor, event.centre)
        self._view_changed(reread=True)

    def on_metric_chart_legend_clicked(self, event: MetricChart.LegendClicked) -> None:
        """A click selects a series; a click on the selected one hides or shows it."""
        if self.view.selected == event.label:
            self.view.toggle_hidden()
        else:
            self.view.selected = event.label
        self._view_changed()
