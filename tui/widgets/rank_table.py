"""RankTable: one row per rank (state, step, steps/s, lag, last heartbeat); stragglers stand out."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from expman._reader.progress import RankProgress

from .status import status_text

COLUMNS = ("rank", "host", "state", "step", "steps/s", "lag", "heartbeat", "")


class RankTable(DataTable):
    DEFAULT_CSS = "RankTable { height: 1fr; }"

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        for name in COLUMNS:
            self.add_column(name, key=name or "note")

    def show(self, rows: list[RankProgress]) -> None:
        cursor = self.cursor_row
        self.clear()
        for row in rows:
            style = "bold red" if row.straggler else ""
            cells = [
                Text(str(row.rank), style=style),
                row.host,
                status_text(row.status),
                "" if row.last_step is None else f"{row.last_step:,}",
                "" if row.steps_per_s is None else f"{row.steps_per_s:,.1f}",
                Text("" if row.lag_steps is None else f"{row.lag_steps:,}", style=style),
                "" if row.heartbeat_age_s is None else f"{row.heartbeat_age_s:.0f} s ago",
                Text("straggler", style="bold red") if row.straggler else "",
            ]
            self.add_row(*cells, key=str(row.rank))
        if rows:
            self.move_cursor(row=min(cursor, len(rows) - 1))
