"""HardwarePanel: per host and device, each hardware key as a sparkline with its latest value."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from ..data.hardware import HardwareSeries
from .braille import format_value

_BLOCKS = "▁▂▃▄▅▆▇█"
NO_SAMPLES = "no hardware samples"


def sparkline(values: tuple[float, ...], width: int = 40) -> str:
    values = values[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi == lo:
        return _BLOCKS[0] * len(values)
    scale = (len(_BLOCKS) - 1) / (hi - lo)
    return "".join(_BLOCKS[int((v - lo) * scale)] for v in values)


class HardwarePanel(Static):
    DEFAULT_CSS = "HardwarePanel { height: auto; padding: 0 1; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(Text(NO_SAMPLES, style="dim"), id=id)
        self.series: list[HardwareSeries] = []

    def show(self, series: list[HardwareSeries]) -> None:
        self.series = series
        if not series:
            self.update(Text(NO_SAMPLES, style="dim"))
            return
        table = Table(box=None, pad_edge=False, expand=False)
        for name in ("host", "device", "key", "recent", "latest"):
            table.add_column(name, no_wrap=True)
        for s in series:
            table.add_row(s.host, s.device, s.key, Text(sparkline(s.values), style="cyan"),
                          "" if s.latest is None else format_value(s.latest))
        self.update(table)
