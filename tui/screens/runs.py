"""The Runs screen: every run under the root, newest first, filtered by text and status, live."""

from __future__ import annotations

import datetime as dt
from pathlib import PurePath

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Label

from expman._storage.layout import STATUSES

from ..data.run_filter import param_columns
from ..data.runs import DEFAULT_KEY_METRICS, RunIndex, RunSummary
from ..data.store import Store
from ..widgets.braille import format_elapsed, format_value
from ..widgets.status import status_text

STATUS_FILTERS = ("all", *STATUSES)
LEFT_COLUMNS = ("experiment", "run", "status")  # then the key metrics and the parameters that vary, then:
RIGHT_COLUMNS = ("started", "duration", "ranks", "hosts")
PARAM = "param:"  # column keys of parameter columns (labels are the bare names)


def sort_value(s: RunSummary, column: str, now: float) -> tuple:
    """What a column sorts by: numbers as numbers, text as text, runs without a value last."""
    if column == "run":
        value: object = s.path.name
    elif column == "duration":
        value = s.duration(now)
    elif column == "ranks":
        value = s.ranks
    elif column == "hosts":
        value = ",".join(s.hosts)
    elif column in ("experiment", "status", "started"):
        value = getattr(s, column)
    elif column.startswith(PARAM):
        value = s.params.get(column[len(PARAM):])
    else:
        value = s.latest.get(column)
    if value is None:
        return (2, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def format_started(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


class RunsScreen(Screen):
    BINDINGS = [
        Binding("enter", "open", "Open run"),
        Binding("space", "mark", "Mark for compare"),
        Binding("c", "compare", "Compare marked"),
        Binding("slash", "focus_filter", "Filter"),
        Binding("s", "cycle_status", "Status filter"),
        Binding("o", "sort", "Sort by next column"),
        Binding("O", "reverse", "Reverse the sort", show=False),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]
    DEFAULT_CSS = """
    RunsScreen #bar { height: 1; padding: 0 1; background: $boost; }
    RunsScreen #bar Label { width: auto; margin-right: 2; }
    RunsScreen #filter { height: 3; }
    RunsScreen #runs { height: 1fr; }
    """

    def __init__(self, root: Store, key_metrics: tuple[str, ...] = DEFAULT_KEY_METRICS, label: str | None = None) -> None:
        super().__init__()
        self.root = root.root
        self.label = label or root.label
        self.index = RunIndex(root, key_metrics)
        self.summaries: list[RunSummary] = []
        self.shown: list[RunSummary] = []
        self.marked: set[PurePath] = set()
        self.status_filter = "all"
        self.key_columns: list[str] = []
        self.param_columns: list[str] = []
        self.sort_by: str | None = None  # a column key; None: newest first
        self.sort_reverse = False
        self._rows_shown: dict[PurePath, list[str]] = {}  # the cells of each row as shown: only changes are redrawn
        self.scans = 0  # completed scans: tests wait on it
        self._scanning = False

    def compose(self) -> ComposeResult:
        with Horizontal(id="bar"):
            yield Label(Text.assemble(("expman ", "bold"), self.label), id="root")
            yield Label("", id="status-filter")
            yield Label("newest first", id="sort")
            yield Label("", id="counts")
        yield Input(placeholder="/ filter runs: words, lr=0.001, loss<0.5, optimizer.name!=sgd, tag:x", id="filter")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_screen_resume(self) -> None:
        if self.scans:
            self.scan()

    def on_mount(self) -> None:
        self._show_status_filter()
        self.query_one("#runs", DataTable).focus()
        self.scan()
        self.set_interval(self.app.poll_interval * 2, self.scan)

    # --- data --------------------------------------------------------------------------
    def scan(self) -> None:
        """Start a scan unless one is running, or another screen covers this one (it scans when shown again)."""
        # `is_current` also holds for a screen Textual keeps drawn behind another: ask for the top one.
        if not self._scanning and (self.app.screen is self or not self.scans):
            self._scanning = True
            self._scan()

    @work(thread=True, exclusive=True, group="runs-scan")
    def _scan(self) -> None:
        try:
            version = self.index.version
            summaries = self.index.scan()
            columns = self.index.key_columns(summaries)
            changed = self.index.version != version or not self.scans
        except Exception as exc:  # a broken root must not kill the screen
            self.app.call_from_thread(self.notify, f"could not list runs: {exc}", severity="error")
            summaries, columns, changed = [], [], True
        finally:
            self._scanning = False
        if not changed and not any(s.status == "running" for s in summaries):
            self.scans += 1  # nothing new and no clock to follow: leave the screen alone
            return
        try:
            self.app.call_from_thread(self._apply, summaries, columns)
        except Exception:  # the app is closing
            pass

    def _apply(self, summaries: list[RunSummary], columns: list[str]) -> None:
        if self not in self.app.screen_stack or not self.is_attached or not self.is_mounted:
            return  # closed (or not built yet) when the worker finished: nothing to show
        self.summaries = summaries
        self.key_columns = columns
        self._fill()
        self.scans += 1

    def _row(self, s: RunSummary, now: float) -> list:
        duration = s.duration(now)
        return [
            Text("●", style="bold yellow") if s.path in self.marked else "",
            s.experiment,
            s.path.name,
            status_text(s.status),
            *[format_value(s.latest[k]) if k in s.latest else "" for k in self.key_columns],
            *[_param_text(s.params.get(k[len(PARAM):])) for k in self.param_columns],
            format_started(s.started),
            "" if duration is None else format_elapsed(duration),
            f"{s.ranks}/{s.world_size}" if s.world_size > s.ranks else str(s.ranks),
            ",".join(s.hosts),
        ]

    def _fill(self) -> None:
        """Show the runs that pass the filters. With the same rows in the same order (the
        usual case: a few live runs ticking), only the cells that changed are updated."""
        table = self.query_one("#runs", DataTable)
        text = self.query_one("#filter", Input).value
        shown = [s for s in self.summaries
                 if s.matches(text) and (self.status_filter == "all" or s.status == self.status_filter)]
        now = self.app.clock()
        if self.sort_by is not None:
            shown.sort(key=lambda s: sort_value(s, self.sort_by or "", now), reverse=self.sort_reverse)
            missing = [s for s in shown if sort_value(s, self.sort_by, now)[0] == 2]
            shown = [s for s in shown if s not in missing] + missing  # no value: last either way
        self.param_columns = [PARAM + k for k in param_columns(shown or self.summaries)]
        names = ["", *LEFT_COLUMNS, *self.key_columns, *self.param_columns, *RIGHT_COLUMNS]
        same_columns = [str(c.key.value) for c in table.columns.values()] == [n or "mark" for n in names]
        if same_columns and [s.path for s in shown] == [s.path for s in self.shown] and table.row_count == len(shown):
            for s in shown:
                row = self._row(s, now)
                if self._rows_shown.get(s.path) != [str(c) for c in row]:
                    for key, value in zip(names, row):
                        table.update_cell(str(s.path), key or "mark", value)
                    self._rows_shown[s.path] = [str(c) for c in row]
        else:
            self._rebuild(table, shown, names, same_columns, now)
        self.shown = shown
        self.query_one("#counts", Label).update(f"{len(shown)} of {len(self.summaries)} runs"
                                                 + (f", {len(self.marked)} marked" if self.marked else ""))

    def _rebuild(self, table: DataTable, shown: list[RunSummary], names: list[str], same_columns: bool,
                 now: float) -> None:
        current = None
        if table.row_count and 0 <= table.cursor_row < len(self.shown):
            current = str(self.shown[table.cursor_row].path)
        if not same_columns:
            table.clear(columns=True)
            for name in names:
                label = Text(name[len(PARAM):] + "=", style="italic") if name.startswith(PARAM) else name
                if name and name == self.sort_by:
                    label = Text.assemble(label, " ↓" if self.sort_reverse else " ↑")
                table.add_column(label, key=name or "mark")
        else:
            table.clear()
        self._rows_shown = {}
        for s in shown:
            row = self._row(s, now)
            table.add_row(*row, key=str(s.path))
            self._rows_shown[s.path] = [str(c) for c in row]
        if current is not None:
            paths = [str(s.path) for s in shown]
            if current in paths:
                table.move_cursor(row=paths.index(current))

    # --- actions ---------------------------------------------------------------------------
    def _current(self) -> RunSummary | None:
        table = self.query_one("#runs", DataTable)
        if not self.shown or not (0 <= table.cursor_row < len(self.shown)):
            return None
        return self.shown[table.cursor_row]

    @on(DataTable.RowSelected, "#runs")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def action_open(self) -> None:
        summary = self._current()
        if summary is not None:
            self.app.open_run(summary.path)

    def action_mark(self) -> None:
        summary = self._current()
        if summary is None:
            return
        self.marked ^= {summary.path}
        self._fill()

    def action_compare(self) -> None:
        marked = [s.path for s in self.summaries if s.path in self.marked]
        if len(marked) < 2:
            self.notify("mark two or more runs with space, then press c", severity="warning")
            return
        self.app.open_compare(marked)

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_clear_filter(self) -> None:
        self.query_one("#filter", Input).value = ""
        self.query_one("#runs", DataTable).focus()

    def action_sort(self) -> None:
        """Sort by the next column (after the last one: newest first again)."""
        table = self.query_one("#runs", DataTable)
        columns = [str(c.key.value) for c in table.columns.values()][1:]
        at = columns.index(self.sort_by) + 1 if self.sort_by in columns else 0
        self.sort_by = columns[at] if at < len(columns) else None
        self._sorted()

    def action_reverse(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self._sorted()

    @on(DataTable.HeaderSelected, "#runs")
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        """A click on a column's header sorts by it; a second click reverses."""
        event.stop()
        key = str(event.column_key.value)
        if key == "mark":
            return
        if key == self.sort_by:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_by, self.sort_reverse = key, False
        self._sorted()

    def _sorted(self) -> None:
        self.query_one("#runs", DataTable).clear(columns=True)  # the arrow moves to the new column
        self._fill()
        label = "newest first" if self.sort_by is None else \
            f"sorted by {self.sort_by.removeprefix(PARAM)} {'↓' if self.sort_reverse else '↑'}"
        self.query_one("#sort", Label).update(label)

    def action_cycle_status(self) -> None:
        at = STATUS_FILTERS.index(self.status_filter)
        self.status_filter = STATUS_FILTERS[(at + 1) % len(STATUS_FILTERS)]
        self._show_status_filter()
        self._fill()

    def _show_status_filter(self) -> None:
        self.query_one("#status-filter", Label).update(Text.assemble("status: ", status_text(self.status_filter)))

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._fill()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.query_one("#runs", DataTable).focus()


def _param_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format_value(value)
    return str(value)
