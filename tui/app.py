"""ExpmanApp: the shell. It owns the root (folder or bucket), the clock and the poll interval, and moves between screens."""

from __future__ import annotations

import os
import time
from pathlib import Path, PurePath
from typing import Callable

from textual.app import App
from textual.binding import Binding

from .data.runs import DEFAULT_KEY_METRICS, find_run
from .data.store import Store
from .screens.compare import CompareScreen
from .screens.help import HelpScreen, bindings_of
from .screens.run import RunScreen
from .screens.runs import RunsScreen

SERVER_CHECK_S = 1.0  # served in a browser: how often to check that the server is still there
OPEN_ENV = "EXPMAN_TUI_OPEN"  # a run to open first (set by `--serve` for a /run/REF page)


class ExpmanApp(App):
    TITLE = "expman"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, root: str | Path | Store, *, clock: Callable[[], float] = time.time,
                 poll_interval: float | None = None, key_metrics: tuple[str, ...] = DEFAULT_KEY_METRICS) -> None:
        """`root`: a folder, a URI (s3://bucket/prefix) or a Store; `poll_interval` defaults
        to the store's (0.25 s on a local disk, 2 s on a bucket)."""
        super().__init__()
        self.store = root if isinstance(root, Store) else Store.open(root)
        self.root = self.store.root
        self.root_label = self.store.label  # shown as given (a relative root stays relative)
        self.clock = clock
        self.poll_interval = poll_interval if poll_interval is not None else self.store.poll_interval
        self.key_metrics = key_metrics

    def on_mount(self) -> None:
        self.push_screen(RunsScreen(self.store, self.key_metrics, label=self.root_label))
        ref = os.environ.get(OPEN_ENV)
        if ref:
            try:
                self.open_run(find_run(self.store, ref))
            except (ValueError, OSError) as exc:
                self.notify(str(exc), severity="error", timeout=10)
        if self.is_web:
            # Under `expman-tui --serve` the server is our parent. If it dies without telling
            # us (kill -9), we are re-parented; leave rather than poll the runs for nobody.
            self.server_pid = os.getppid()
            self.set_interval(SERVER_CHECK_S, self.leave_if_server_gone)

    def leave_if_server_gone(self) -> None:
        if os.getppid() != self.server_pid:
            self.exit()

    def open_run(self, run_dir: PurePath) -> None:
        self.push_screen(RunScreen(run_dir, self.store))

    def open_compare(self, run_dirs: list[PurePath]) -> None:
        self.push_screen(CompareScreen(run_dirs, self.store))

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.pop_screen()
            return
        self.push_screen(HelpScreen(self.screen, bindings_of(self)))
