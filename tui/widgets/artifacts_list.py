"""ArtifactsList: the run's artifacts, name and size."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable


def human_size(size: int) -> str:
    if size < 0:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)


class ArtifactsList(DataTable):
    DEFAULT_CSS = "ArtifactsList { height: 1fr; }"

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_column("artifact", key="name")
        self.add_column("size", key="size")
        self.show([])

    def show(self, rows: list[tuple[str, int]] | str) -> None:
        """The artifacts, or (a str) why they could not be read."""
        self.clear()
        if isinstance(rows, str):
            self.add_row(Text(rows, style="bold red"), "")
            return
        for name, size in rows:
            self.add_row(name, human_size(size), key=name)
        if not rows:
            self.add_row(Text("no artifacts", style="dim"), "")
