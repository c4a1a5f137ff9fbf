"""Run and rank status in colour, the same everywhere."""

from __future__ import annotations

from rich.text import Text

STATUS_STYLES = {
    "running": "bold dodger_blue1",
    "finished": "green",
    "failed": "bold red",
    "killed": "magenta",
    "crashed": "bold white on red",
}


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, "dim"))
