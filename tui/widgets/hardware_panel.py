"""HardwarePanel: per host, device and rank, each hardware key's whole-run history as a sparkline.

Series of one family (data/hardware.py: `memory.*` bytes, every percent of the GPUs…)
share a scale, percents from 0 to 100, so a constant 100% CPU draws as a full bar and
not as the lowest one. Values read in human units (GB, MB/s, °C, W); a series that never
changed shows its value, not a flat line.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from ..data.hardware import HardwareSeries, family_of, unit_of
from .braille import format_value

_BLOCKS = " ▁▂▃▄▅▆▇█"
NO_SAMPLES = "no hardware samples"


def sparkline(values: tuple[float, ...], low: float, high: float) -> str:
    """One block per value on the scale low..high (blank at low, full at high)."""
    if not values:
        return ""
    span = high - low
    if span <= 0:
        return _BLOCKS[-1] * len(values)
    top = len(_BLOCKS) - 1
    return "".join(_BLOCKS[max(0, min(top, int(round((v - low) / span * top))))] for v in values)


def human(value: float | None, unit: str) -> str:
    """`81.4 GB`, `12.5 MB/s`, `71 °C`, `250 W`, `97.0%`."""
    if value is None:
        return ""
    if unit in ("B", "B/s"):
        magnitude = abs(value)
        for limit, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if magnitude >= limit:
                return f"{value / limit:.3g} {prefix}{unit}"
        return f"{value:.0f} {unit}"
    if unit == "%":
        return f"{value:.1f}%"
    if unit:
        return f"{value:.4g} {unit}"
    return format_value(value)


def scales(series: list[HardwareSeries]) -> dict[tuple[str, str], tuple[float, float]]:
    """The shared range of each family: 0..100 for percents (more if a process uses several cores),
    else 0 (or the lowest value, if below) up to the highest value any of its series reached."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for s in series:
        if s.high is None or s.low is None:
            continue
        family = family_of(s.key)
        lo, hi = out.get(family, (0.0, 100.0 if family[1] == "%" else 0.0))
        out[family] = (min(lo, s.low), max(hi, s.high))
    return out


class HardwarePanel(Static):
    DEFAULT_CSS = "HardwarePanel { height: auto; padding: 0 1; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(Text(NO_SAMPLES, style="dim"), id=id)
        self.series: list[HardwareSeries] = []
        self.table: Table | None = None  # what is shown (tests read it)

    def show(self, series: list[HardwareSeries]) -> None:
        self.series = series
        if not series:
            self.update(Text(NO_SAMPLES, style="dim"))
            return
        ranges = scales(series)
        table = Table(box=None, pad_edge=False, expand=False)
        for name in ("host", "device", "rank", "key", "whole run (max per bucket)", "min–max", "latest"):
            table.add_column(name, no_wrap=True)
        for s in series:
            unit = unit_of(s.key)
            if s.latest is None:  # text only (gpu.name): the text
                history, span, latest = Text(""), "", Text(s.text)
            elif s.constant:
                history, span = Text("constant", style="dim"), ""
                latest = Text(human(s.latest, unit) + (f"  {s.text}" if s.text else ""))
            else:
                lo, hi = ranges.get(family_of(s.key), (s.low or 0.0, s.high or 1.0))
                history = Text(sparkline(s.values, lo, hi), style="cyan")
                span = f"{human(s.low, unit)}–{human(s.high, unit)}"
                latest = Text(human(s.latest, unit))
            table.add_row(s.host, _short(s.device), "" if s.rank is None else str(s.rank), s.key, history, span,
                          latest)
        self.table = table
        self.update(table)


def _short(device: str) -> str:
    """GPU UUIDs are long: `GPU-1a2b3c4d…` is enough to tell them apart on a host."""
    return device[:12] + "…" if len(device) > 13 else device
