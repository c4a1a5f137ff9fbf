"""Watching a live run from a notebook.

    import expman.notebook
    exp = expman.start_experiment("mnist")          # training in another cell / thread / process
    expman.notebook.watch(exp, ["loss"], every=2.0)  # refreshes one output until the run ends

An `expman.Run` or `expman.Experiment` shown as a cell's value is already a compact HTML
summary (`_repr_html_`) with the latest images and histograms; `run.plot(keys)` draws
matplotlib charts that show inline as PNG (no `%matplotlib inline` needed).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

from expman._errors import RunNotFoundError
from expman._reader.notebook import pending_html, run_html
from expman._reader.run import Run

__all__ = ["watch"]


def watch(
    run: Any,
    keys: str | Iterable[str] | None = None,
    every: float = 2.0,
    *,
    timeout: float | None = None,
    display: Callable[[str], Any] | None = None,
) -> str:
    """Show the run's HTML summary and refresh it every `every` seconds until the run has
    ended (or `timeout` seconds passed); returns the last HTML shown (a str that Jupyter
    does not show again as a cell's value: the display above already shows it).

    `run` is an `expman.Experiment`, the run `expman.init()` returned, an `expman.Run`, a
    run directory or a run id. `keys` limits the metrics shown. `display` replaces
    IPython's display (it is called with the HTML each refresh).
    """
    if not every > 0:
        raise ValueError(f"every must be positive seconds, got {every!r}")
    show = display or _ipython_display()
    wanted = [keys] if isinstance(keys, str) else (list(keys) if keys is not None else None)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        opened = _open(run)
        # the status first: the page, read after it, is at least as new, so the last page shown
        # is never an older "running" one (run.yaml is read afresh each time)
        ended = opened is not None and opened.status not in ("running", "unknown")
        page = pending_html(str(run)) if opened is None else _html(opened, wanted)
        show(page)
        if ended or (deadline is not None and time.monotonic() >= deadline):
            return ShownHTML(page)
        time.sleep(every if deadline is None else max(0.0, min(every, deadline - time.monotonic())))


class ShownHTML(str):
    """HTML already on screen: as the last line of a cell, IPython shows nothing for it
    (its plain repr would be the raw HTML text under the rendered summary)."""

    def _ipython_display_(self) -> None:
        pass


def _open(run: Any) -> Run | None:
    if isinstance(run, Run):
        return run
    path = getattr(run, "run_dir", None)  # Experiment, or the run expman.init() returned
    try:
        if path is not None:
            return Run(path)
        from expman._reader.run import open_run

        return open_run(run if isinstance(run, (str, os.PathLike)) else str(run))
    except RunNotFoundError:
        return None  # the collector has not written it yet


def _html(run: Run, keys: list[str] | None) -> str:
    if keys is None:
        return run_html(run)
    return run_html(_KeysView(run, keys))  # type: ignore[arg-type]


class _KeysView:
    """A Run whose metrics() is limited to some keys (what watch(keys=...) shows)."""

    def __init__(self, run: Run, keys: list[str]) -> None:
        self._run, self._keys = run, keys
        self.path = run.path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run, name)

    def metrics(self, keys: Any = None, **kwargs: Any) -> Any:
        return self._run.metrics(self._keys if keys is None else keys, **kwargs)


def _ipython_display() -> Callable[[str], Any]:
    try:
        from IPython.display import HTML, display
    except ImportError as exc:
        raise ImportError("watch() shows its output through IPython; run it in Jupyter or pass display=") from exc
    handle = None

    def show(page: str) -> None:
        nonlocal handle
        if handle is None:
            handle = display(HTML(page), display_id=True)
        else:
            handle.update(HTML(page))

    return show
