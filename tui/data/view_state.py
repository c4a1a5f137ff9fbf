"""What the user chose on a chart screen, kept per experiment across sessions.

One small YAML file, `$XDG_STATE_HOME/expman/tui.yaml` (else ~/.local/state/expman/tui.yaml),
maps an experiment to its chosen keys and chart toggles. Reopening a run of the same
experiment brings them back. A missing, unreadable or hand-broken file is never an error:
the defaults apply, and the next change writes a whole new file (atomically).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from expman._errors import ExpmanError
from expman._storage.layout import read_yaml, write_yaml_atomic

from ..widgets.chart_view import ChartView

STATE_FILE = "tui.yaml"
MAX_EXPERIMENTS = 200  # oldest entries dropped past this many
_LOCK = threading.Lock()


def state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or "~/.local/state"
    return Path(base).expanduser() / "expman" / STATE_FILE


def _read_all() -> dict[str, Any]:
    try:
        data = read_yaml(state_path())
    except (ExpmanError, OSError):
        return {}
    return data.get("experiments") if isinstance(data.get("experiments"), dict) else {}


def load(scope: str) -> tuple[list[str] | None, ChartView, str | None]:
    """(chosen keys or None, the chart toggles, rank mode or None) saved for `scope` (an experiment)."""
    entry = _read_all().get(scope)
    view = ChartView()
    if not isinstance(entry, dict):
        return None, view, None
    keys = entry.get("keys")
    keys = [str(k) for k in keys] if isinstance(keys, list) else None
    try:
        view.smoothing = min(0.999, max(0.0, float(entry.get("smoothing", 0.0))))
        view.columns = max(0, min(6, int(entry.get("columns", 0))))
    except (TypeError, ValueError):
        pass
    view.log_y = bool(entry.get("log_y", False))
    view.robust = bool(entry.get("robust", False))
    mode = entry.get("mode")
    return keys, view, str(mode) if isinstance(mode, str) else None


def save(scope: str, keys: list[str] | None, view: ChartView, mode: str | None) -> None:
    """Remember `scope`'s choice. Failing to write (read-only home) only loses the memory."""
    entry: dict[str, Any] = {"smoothing": view.smoothing, "log_y": view.log_y, "robust": view.robust,
                             "columns": view.columns}
    if keys is not None:
        entry["keys"] = list(keys)
    if mode is not None:
        entry["mode"] = mode
    with _LOCK:
        experiments = _read_all()
        experiments.pop(scope, None)
        experiments[scope] = entry  # newest last
        while len(experiments) > MAX_EXPERIMENTS:
            experiments.pop(next(iter(experiments)))
        try:
            write_yaml_atomic(state_path(), {"experiments": experiments})
        except OSError:
            pass
