"""The Compare screen: two or more runs overlaid on the same keys (mean over ranks), and a params diff.

The same chart tools as the Run screen (chart_tools.py); a run is a series here, so `n`
selects one, `h` hides it and `o` shows it alone. The y range is robust by default, so a
diverged run is pinned to the top edge instead of flattening the others. Runs are named
`experiment/name·id` (short id), so two runs of the same name stay apart.
"""

from __future__ import annotations

from pathlib import PurePath

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label

from expman._storage.layout import CONFIG_YAML, RUN_YAML

from ..data.runs import read_yaml_safe
from ..data.series import X_STEP, X_TIME, MetricsSource, Series
from ..data.store import Store
from ..widgets.braille import Line
from ..data import view_state
from ..widgets.chart import MEAN, MetricChart, chart_request, chart_title, lines_for_run, x_formatter
from ..widgets.chart_grid import ChartGrid
from ..widgets.key_picker import KeyPicker
from ..widgets.params_table import ParamsDiff
from .chart_tools import CHART_BINDINGS, ChartTools
from .run import default_keys

SHORT_ID = 8
COMPARE_SCOPE = "(compare)"  # choices on the Compare screen are remembered apart from any one experiment


def run_label(info: dict, path: PurePath) -> str:
    """`mnist/baseline·aaaa0001`: experiment, name and short id, unique where names repeat."""
    uid = str(info.get("id") or path.name.rsplit("-", 1)[-1])[:SHORT_ID]
    name = str(info.get("name") or path.name)
    return f"{info.get('experiment') or path.parent.name}/{name}·{uid}"


class CompareScreen(ChartTools, Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("x", "toggle_x", "x: step/time"),
        Binding("d", "toggle_diff", "All params/diff"),
        Binding("slash", "focus_keys", "Filter keys"),
        *CHART_BINDINGS,
    ]
    DEFAULT_CSS = """
    CompareScreen #compare-header { height: 1; padding: 0 1; background: $boost; width: 1fr; }
    CompareScreen #compare-row { height: 1fr; }
    CompareScreen #compare-charts { height: 1fr; }
    CompareScreen ParamsDiff { border-top: solid $primary-background; }
    """

    def __init__(self, run_dirs: list[PurePath], store: Store | None = None) -> None:
        super().__init__()
        self.run_dirs = list(run_dirs)
        self.files = (store or Store.local(self.run_dirs[0])).files  # the local disk, or a bucket
        self.names = [run_label(read_yaml_safe(p / RUN_YAML, self.files), p) for p in self.run_dirs]
        self.sources = [MetricsSource(p, files=self.files) for p in self.run_dirs]
        self.xkind = X_STEP
        self.only_different = True
        saved_keys, self.view, _mode = view_state.load(COMPARE_SCOPE)
        if not (self.view.robust or saved_keys is not None):
            self.view.robust = True  # first use: one diverged run must not flatten the others
        self.saved_keys = saved_keys
        self.chosen: list[str] | None = None
        self.series: list[dict[str, Series]] = [{} for _ in self.run_dirs]
        self.params: list[dict] = [{} for _ in self.run_dirs]
        self.polls = 0
        self._busy = False
        self._last_request: tuple = ()

    def compose(self) -> ComposeResult:
        yield Label("", id="compare-header")
        with Horizontal(id="compare-row"):
            yield KeyPicker(id="keys", leave_to="#compare-charts")
            with Vertical():
                self.grid = ChartGrid(self.view, id="compare-charts")
                yield self.grid
                yield ParamsDiff(id="params-diff")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#compare-charts").focus()
        self._show_header()
        self.poll()
        self.set_interval(self.app.poll_interval * 2, self.poll)

    def _request(self) -> tuple:
        return chart_request(self, self.chosen, self.xkind, self.view.zoom)

    def poll(self) -> None:
        if self._busy:
            return
        self._busy = True
        request = self._request()
        self._read(request, request != self._last_request)

    @work(thread=True, exclusive=True, group="compare-read")
    def _read(self, request: tuple, force: bool) -> None:
        chosen, xkind, target = request
        try:
            changed = [source.refresh() for source in self.sources]
            keys = sorted({k for source in self.sources for k in source.keys()})
            if chosen is None:
                remembered = tuple(k for k in self.saved_keys or () if k in keys)
                chosen = remembered or tuple(default_keys(keys))
            series = [source.series(list(chosen), xkind, target) if (c or force) else None
                      for source, c in zip(self.sources, changed)]
            params = [read_yaml_safe(p / CONFIG_YAML, self.files) for p in self.run_dirs]
            infos = [read_yaml_safe(p / RUN_YAML, self.files) for p in self.run_dirs]
        except Exception as exc:
            self._busy = False
            self.app.call_from_thread(self.notify, f"compare failed: {exc}", severity="error")
            return
        try:
            self.app.call_from_thread(self._apply, (chosen, xkind, target), keys, series, params, infos)
        except Exception:  # the app is closing, or the screen went away meanwhile
            pass

    def _apply(self, request: tuple, keys: list[str], series: list, params: list[dict], infos: list[dict]) -> None:
        if self not in self.app.screen_stack or not self.is_attached or not self.is_mounted:
            return  # closed (or not built yet) when the worker finished: nothing to show
        self._busy = False
        self._last_request = request
        if self.chosen is None:
            self.chosen = list(request[0])
            self.query_one(KeyPicker).set_keys(keys, self.chosen)
            self._sync_charts()
        else:
            self.query_one(KeyPicker).set_keys(keys)
        for i, found in enumerate(series):
            if found is not None:
                self.series[i].update(found)
        self.names = [run_label(info, p) for info, p in zip(infos, self.run_dirs)]
        if params != self.params or self.polls == 0:
            self.params = params
            self._show_params()
        self._draw()
        self._show_header()
        self.polls += 1

    def _show_header(self) -> None:
        header = Text.assemble(("compare ", "bold"), "  vs  ".join(self.names), "  ",
                               (f"x={self.xkind}  {self.view.status()}  {self.grid.label()}", "dim"))
        self.query_one("#compare-header", Label).update(header)

    def _remember(self) -> None:
        view_state.save(COMPARE_SCOPE, self.chosen, self.view, None)

    def _show_params(self) -> None:
        self.query_one(ParamsDiff).show(self.names, self.params, self.only_different)

    def _sync_charts(self) -> None:
        self.grid.set_keys(list(self.chosen or []))

    def _draw(self) -> None:
        for chart in self.query(MetricChart):
            found = [s.get(chart.key) for s in self.series]
            present = [(i, s) for i, s in enumerate(found) if s is not None and s.xkind == self.xkind]
            lines: list[Line] = []
            for i, s in present:
                lines.extend(lines_for_run(s, MEAN, first_color=i, label=self.names[i]))
            if not present:
                continue
            lo = min((s.x_range[0] for _i, s in present if not s.empty), default=0.0)
            hi = max((s.x_range[1] for _i, s in present if not s.empty), default=1.0)
            title = chart_title(chart.key, [s for _i, s in present], lines)
            chart.show(title, lines, (lo, hi), x_formatter(self.xkind, lo))

    @on(KeyPicker.Changed)
    def _keys_changed(self, event: KeyPicker.Changed) -> None:
        self.chosen = event.keys
        self._sync_charts()
        self._remember()
        self._draw()
        self.poll()

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_toggle_x(self) -> None:
        self.xkind = X_TIME if self.xkind == X_STEP else X_STEP
        self._show_header()
        self.poll()

    def action_toggle_diff(self) -> None:
        self.only_different = not self.only_different
        self._show_params()

    def action_focus_keys(self) -> None:
        self.query_one(KeyPicker).focus_filter()
