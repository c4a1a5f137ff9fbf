"""ParamsTable: a run's parameters as dotted keys; ParamsDiff: several runs side by side."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from expman._reader.params import flat_params

from ..data.runs import params_diff


def show_value(value: Any) -> str:
    if value is None:
        return "—"
    return str(value)


class ParamsTable(DataTable):
    DEFAULT_CSS = "ParamsTable { height: 1fr; }"

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_column("parameter", key="parameter")
        self.add_column("value", key="value")

    def show(self, params: dict[str, Any]) -> None:
        self.clear()
        for key, value in flat_params(params).items():
            self.add_row(key, show_value(value), key=key)


class ParamsDiff(DataTable):
    """Rows where the runs' parameters differ (or all rows, with `only_different=False`)."""

    DEFAULT_CSS = "ParamsDiff { height: auto; max-height: 14; }"

    def show(self, names: list[str], params: list[dict[str, Any]], only_different: bool = True) -> None:
        self.clear(columns=True)
        self.add_column("parameter", key="parameter")
        for i, name in enumerate(names):
            self.add_column(name, key=f"run{i}")
        rows = params_diff(params, only_different)
        for key, values in rows:
            cells = [Text(show_value(v), style="bold" if only_different else "") for v in values]
            self.add_row(key, *cells, key=key)
        if not rows:
            self.add_row(Text("no differences" if only_different else "no parameters", style="dim"),
                         *[""] * len(names))
