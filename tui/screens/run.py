"""The Run screen: charts of chosen keys, ranks, hardware, params, the log's tail, artifacts, media.

One worker at a time reads everything new (off the UI thread) and hands the result to
`_apply`; a timer starts the next read every poll interval.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.lazy import Lazy
from textual.screen import Screen
from textual.widgets import Footer, Label, Log, TabbedContent, TabPane

from expman._storage.layout import CONFIG_YAML, FINAL_STATUSES, RUN_LOG, RUN_YAML

from ..data.hardware import HardwareSeries, read_hardware
from expman._storage.layout import parse_time

from ..data.media import MediaCatalog, MediaSource
from ..data.runs import LogTail, artifacts, rank_rows, read_yaml_safe
from ..data import view_state
from ..data.series import X_STEP, X_TIME, MetricsSource, Series
from ..data.store import Store
from ..widgets.artifacts_list import ArtifactsList
from ..widgets.braille import format_elapsed
from ..widgets.chart import (
    MEAN, MEDIAN, MODES, PER_RANK, MetricChart, chart_request, chart_title, default_target, lines_for_run, x_formatter,
)
from ..widgets.chart_grid import ChartGrid
from .chart_tools import CHART_BINDINGS, ChartTools
from ..widgets.hardware_panel import HardwarePanel
from ..widgets.key_picker import KeyPicker
from ..widgets.media_panel import MediaPanel
from ..widgets.params_table import ParamsTable
from ..widgets.rank_table import RankTable
from ..widgets.status import status_text

TABS = ("charts", "ranks", "hardware", "params", "log", "artifacts", "media")
SLOW_EVERY = 5  # hardware, artifacts and params are read every this many polls
ENDED_QUIET_POLLS = 8  # an ended run unchanged for this many reads in a row ...
ENDED_POLL_EVERY = 8  # ... is read every this many ticks of the poll timer (2 s by default), not every tick


MODE_NAMES = {MEDIAN: "median±band", PER_RANK: "per rank", MEAN: "mean±band"}


def _rank_of(label: str | None) -> int | None:
    """`r3` (or `r3 slowest`) -> 3: the rank whose own last value the title shows."""
    if label and label.startswith("r") and label[1:].split(" ")[0].isdigit():
        return int(label[1:].split(" ")[0])
    return None


def default_keys(keys: list[str]) -> list[str]:
    for pick in (lambda k: k == "loss", lambda k: k.endswith("/loss") or k.endswith(".loss"), lambda k: "loss" in k):
        found = [k for k in keys if pick(k)]
        if found:
            return found[:1]
    return keys[:1]


@dataclass
class Snapshot:
    """What one read found: handed from the worker to the UI thread."""

    info: dict[str, Any]
    keys: list[str] | None
    series: dict[str, Series] | None
    log_lines: list[str]
    params: dict[str, Any] | None = None
    hardware: list[HardwareSeries] | None = None
    artifacts: list[tuple[str, int]] | str | None = None  # a str: why they could not be read
    media: MediaCatalog | None = None
    request: tuple = field(default_factory=tuple)


def error_text(error: Any) -> Text | None:
    """`ZeroDivisionError: division by zero` from run.yaml's `error` (None when there is none)."""
    if not isinstance(error, dict) or not (error.get("type") or error.get("message")):
        return None
    return Text.assemble((str(error.get("type") or "error"), "bold red"), ": ", str(error.get("message") or ""))


def error_lines(info: dict[str, Any]) -> list[str]:
    """The run's exception as log lines: which rank, type and message, then the traceback."""
    found = []
    if isinstance(info.get("error"), dict):
        found.append(("run", info["error"]))
    for rank, r in sorted((info.get("ranks") or {}).items(), key=lambda kv: int(kv[0])):
        if isinstance(r, dict) and isinstance(r.get("error"), dict) and r["error"] != info.get("error"):
            found.append((f"rank {rank}", r["error"]))
    lines: list[str] = []
    for where, error in found:
        lines.append(f"── {info.get('status', 'failed')}: {where}: {error.get('type', 'error')}: {error.get('message', '')}")
        lines.extend(str(error.get("traceback") or "").rstrip("\n").splitlines())
    return lines


class RunScreen(ChartTools, Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("x", "toggle_x", "x: step/time"),
        Binding("m", "toggle_mode", "Median/ranks/mean"),
        Binding("slash", "focus_keys", "Filter keys"),
        *CHART_BINDINGS,
        *[Binding(str(i + 1), f"tab('{name}')", name.capitalize(), show=False) for i, name in enumerate(TABS)],
    ]
    DEFAULT_CSS = """
    RunScreen #run-header { height: 1; padding: 0 1; background: $boost; width: 1fr; }
    RunScreen #run-error { height: auto; max-height: 3; padding: 0 1; background: $error 20%; width: 1fr; display: none; }
    RunScreen #run-error.failed { display: block; }
    RunScreen #tabs { height: 1fr; }
    RunScreen TabPane { height: 1fr; padding: 0; }
    RunScreen #charts-row { height: 1fr; }
    RunScreen #charts-area { height: 1fr; }
    RunScreen Log { height: 1fr; }
    """

    def __init__(self, run_dir: PurePath, store: Store | None = None) -> None:
        super().__init__()
        self.store = store or Store.local(run_dir)  # the local disk, or a bucket
        self.run = self.store.open_run(run_dir)
        self.source = MetricsSource(self.run.path, files=self.store.files)
        self.tail = LogTail(self.run.path / RUN_LOG, store=self.store)
        self.media = MediaSource(self.run, self.store)
        self.info: dict[str, Any] = {}
        self.xkind = X_STEP
        self.scope = self.run.path.parent.name  # the experiment: choices are remembered per experiment
        saved_keys, self.view, self.mode = view_state.load(self.scope)
        if self.mode not in MODES:
            self.mode = None  # None: one line for one rank, else the median with its band
        self.chosen: list[str] | None = None  # None until the first read picks a default
        self._error_shown = False
        self._yaml_sig: tuple = ()  # run.yaml's (mtime, size) when last read: unchanged, not read again
        self._slow_final = False  # params, hardware, artifacts read once the run ended: no need to again
        self._ticks = 0
        self._quiet = 0  # reads in a row that found an ended run unchanged
        self.series: dict[str, Series] = {}
        self.polls = 0  # completed reads: tests wait on it
        self._busy = False
        self._last_request: tuple = ()
        self._pending: dict[str, Any] = {}
        self._pending_log: list[str] = []
        # The first read starts now, on a plain thread, while Textual builds the screen:
        # the first chart then waits for the slower of the two, not for both in turn.
        self._first: Future | None = Future()
        first_request = (tuple(saved_keys) if saved_keys else None, X_STEP, default_target(self.app.size.width))
        threading.Thread(target=self._prefetch, args=(first_request,), name="expman-tui-first-read", daemon=True).start()

    def _prefetch(self, request: tuple) -> None:
        try:
            self._first.set_result(self._collect(request, True, True))
        except BaseException as exc:  # handed to the worker, which reports it
            self._first.set_exception(exc)

    def compose(self) -> ComposeResult:
        yield Label("", id="run-header")
        yield Label("", id="run-error")
        with TabbedContent(initial="charts", id="tabs"):
            with TabPane("1 Charts", id="charts"):
                with Horizontal(id="charts-row"):
                    yield KeyPicker(id="keys", leave_to="#charts-area")
                    self.grid = ChartGrid(self.view, id="charts-area")
                    yield self.grid
            # The other tabs mount after the first paint: the chart comes first.
            with TabPane("2 Ranks", id="ranks"):
                yield Lazy(RankTable(id="rank-table"))
            with TabPane("3 Hardware", id="hardware"):
                yield Lazy(VerticalScroll(HardwarePanel(id="hardware-panel")))
            with TabPane("4 Params", id="params"):
                yield Lazy(ParamsTable(id="params-table"))
            with TabPane("5 Log", id="log"):
                yield Lazy(Log(id="log-view", max_lines=5000))
            with TabPane("6 Artifacts", id="artifacts"):
                yield Lazy(ArtifactsList(id="artifacts-list"))
            with TabPane("7 Media", id="media"):
                yield Lazy(MediaPanel(self.run, id="media-panel"))
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#charts-area").focus()
        self.poll()
        self.set_interval(self.app.poll_interval, self.poll)

    # --- reading -------------------------------------------------------------------------
    def _request(self) -> tuple:
        return chart_request(self, self.chosen, self.xkind, self.view.zoom)

    def poll(self) -> None:
        if self._busy:
            return
        self._ticks += 1
        request = self._request()
        if (self._quiet >= ENDED_QUIET_POLLS and self._ticks % ENDED_POLL_EVERY
                and request == self._last_request):
            return  # an ended run that stopped changing: look every ENDED_POLL_EVERY ticks, or when asked anew
        self._busy = True
        self._read(request, request != self._last_request, self.polls % SLOW_EVERY == 0 and not self._slow_final)

    @work(thread=True, exclusive=True, group="run-read")
    def _read(self, request: tuple, force: bool, slow: bool) -> None:
        try:
            first, self._first = self._first, None
            snapshot = first.result() if first is not None else self._collect(request, force, slow)
        except Exception as exc:  # keep the screen alive; say what went wrong
            self._busy = False
            self.app.call_from_thread(self.notify, f"reading {self.run.path.name} failed: {exc}", severity="error")
            return
        try:
            self.app.call_from_thread(self._apply, snapshot)
        except Exception:  # the app is closing, or the screen went away meanwhile
            pass

    def _collect(self, request: tuple, force: bool, slow: bool) -> Snapshot:
        chosen, xkind, target = request
        changed = self.source.refresh()
        keys = self.source.keys() if changed or chosen is None or force else None
        if chosen is not None and self.chosen is None and keys is not None:  # remembered keys: those this run has
            chosen = tuple(k for k in chosen if k in keys) or None
        if chosen is None:
            chosen = tuple(default_keys(keys or []))
        request = (chosen, xkind, target)
        series = self.source.series(list(chosen), xkind, target) if chosen and (changed or force) else None
        snapshot = Snapshot(self._read_info(), keys, series, self.tail.read_new(), request=request)
        if slow:
            snapshot.params = read_yaml_safe(self.run.path / CONFIG_YAML, self.store.files)
            snapshot.hardware = read_hardware(self.run)
            try:
                snapshot.artifacts = artifacts(self.run)
            except Exception as exc:  # a broken manifest: say so in the tab
                snapshot.artifacts = f"could not read the artifacts: {exc}"
            try:
                snapshot.media = self.media.read()
            except Exception as exc:  # a damaged media index: say so, keep the rest of the screen
                self.app.call_from_thread(self.notify, f"could not read the media index: {exc}", severity="error")
        return snapshot

    def _read_info(self) -> dict[str, Any] | None:
        """run.yaml if it changed since the last read (the collector replaces it whole), else None."""
        try:
            sig = self.store.stat(self.run.path / RUN_YAML)
        except OSError:
            return None
        if sig == self._yaml_sig:
            return None
        self._yaml_sig = sig
        return read_yaml_safe(self.run.path / RUN_YAML, self.store.files)

    def _apply(self, snap: Snapshot) -> None:
        if self not in self.app.screen_stack or not self.is_attached or not self.is_mounted:
            return  # closed (or not built yet) when the worker finished: nothing to show
        self._busy = False
        self._last_request = snap.request
        ended = str((snap.info or self.info).get("status")) in FINAL_STATUSES
        if ended and self.chosen is not None and not any(
                (snap.info, snap.keys, snap.series, snap.log_lines, snap.params, snap.hardware, snap.artifacts,
                 snap.media)):
            self.polls += 1  # an ended run with nothing new: leave the screen alone (idle costs ~nothing)
            self._quiet += 1
            return
        self._quiet = 0
        if ended and snap.hardware is not None:
            self._slow_final = True
        self.info = snap.info or self.info
        if self.chosen is None:
            if snap.request[0] or snap.keys:  # a run with no key yet (its first point not stored) chooses when one comes
                self.chosen = list(snap.request[0])
                self.query_one(KeyPicker).set_keys(snap.keys or [], self.chosen)
                self._sync_charts()
        elif snap.keys is not None:
            self.query_one(KeyPicker).set_keys(snap.keys)
        if snap.series is not None:
            self.series.update(snap.series)
            self._draw()
        self._show_header()
        self._pending.update({k: v for k, v in (("params", snap.params), ("hardware", snap.hardware),
                                                ("artifacts", snap.artifacts), ("media", snap.media)) if v is not None})
        self._pending_log.extend(snap.log_lines)
        self._show_error()  # after the log's lines: the traceback is where the run ended
        self._show_panels()
        self.polls += 1

    def _show_panels(self) -> None:
        """Hand what was read to the panels that are mounted (Lazy mounts them after the first paint)."""
        for table in self.query(RankTable):
            table.show(rank_rows(self.info, self.app.clock()))
        for log in self.query(Log):
            if self._pending_log:
                log.write_lines(self._pending_log)
                self._pending_log = []
        targets = {"params": ParamsTable, "hardware": HardwarePanel, "artifacts": ArtifactsList, "media": MediaPanel}
        for name, value in list(self._pending.items()):
            found = list(self.query(targets[name]))
            if found:
                found[0].show(value)
                del self._pending[name]

    # --- drawing ------------------------------------------------------------------------------
    def _show_header(self) -> None:
        info = self.info
        started = parse_time(info.get("started_at"))
        ended = parse_time(info.get("ended_at"))
        duration = info.get("duration_s")
        if duration is None and started is not None:
            duration = (ended or self.app.clock()) - started
        ranks = len(info.get("ranks") or {})
        header = Text.assemble(
            (f"{info.get('experiment', '')}/{self.run.path.name}", "bold"), "  ",
            status_text(str(info.get("status", "unknown"))), "  ",
            f"duration {format_elapsed(duration)}" if duration is not None else "", "  ",
            f"{ranks} rank{'s' if ranks != 1 else ''} on {','.join(info.get('hosts') or []) or '?'}", "  ",
            ("  ".join(p for p in (f"x={self.xkind}", MODE_NAMES[self._mode()] if ranks > 1 else "",
                                   self.view.status(), self.grid.label()) if p), "dim"),
        )
        self.query_one("#run-header", Label).update(header)

    def _show_error(self) -> None:
        """A failed run's exception under the header, and its traceback at the top of the Log tab."""
        text = error_text(self.info.get("error"))
        label = self.query_one("#run-error", Label)
        label.set_class(text is not None, "failed")
        if text is not None:
            label.update(text + Text("  (traceback: 5 Log)", style="dim"))
            if not self._error_shown:
                self._error_shown = True
                self._pending_log.extend(error_lines(self.info))

    def _mode(self) -> str:
        return self.mode if self.mode is not None else MEDIAN

    def _sync_charts(self) -> None:
        """One MetricChart per chosen key on the page shown, in the order chosen."""
        self.grid.set_keys(list(self.chosen or []))
        if not self.chosen:
            self.notify("choose a key on the left (space)", timeout=3)

    def _remember(self) -> None:
        view_state.save(self.scope, self.chosen, self.view, self.mode)

    def _draw(self) -> None:
        mode = self._mode()
        rank = _rank_of(self.view.selected)
        for chart in self.query(MetricChart):
            series = self.series.get(chart.key)
            if series is None or series.xkind != self.xkind:
                continue
            lines = lines_for_run(series, mode)
            message = "no numeric points"
            if series.points and series.empty and self.xkind == X_STEP:
                message = "no points with a step: press x for time"
            chart.show(chart_title(chart.key, [series], lines, rank=rank), lines, series.x_range,
                       x_formatter(self.xkind, series.x_range[0]), message)

    # --- actions --------------------------------------------------------------------------------
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

    def action_toggle_mode(self) -> None:
        self.mode = MODES[(MODES.index(self._mode()) + 1) % len(MODES)]
        self.view.selected = None
        self.view.show_all()
        self._show_header()
        self._draw()
        self._remember()

    def action_focus_keys(self) -> None:
        self.query_one(TabbedContent).active = "charts"
        self.query_one(KeyPicker).focus_filter()

    def action_tab(self, name: str) -> None:
        self.query_one(TabbedContent).active = name

    @on(TabbedContent.TabActivated)
    def _tab_shown(self, event: TabbedContent.TabActivated) -> None:
        """A panel mounted late (Lazy) gets what was read for it now, not at the next poll."""
        self.call_after_refresh(self._show_panels)
        if event.pane.id == "media":
            self.call_after_refresh(lambda: [panel.focus_keys() for panel in self.query(MediaPanel)])
