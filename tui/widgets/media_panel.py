"""MediaPanel: the Run screen's Media tab. A list of the run's media keys on the left; on
the right the chosen key at one step and one rank, with a step slider: an image (or a
video's first frame) in half blocks, a histogram key as a heatmap over steps, a table as
a DataTable, audio as its facts.

Items are read on a worker thread (`Run.read_media`), one at a time, the newest request
winning; the screen hands in the catalog (`show`) when it changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Label, OptionList, Static
from textual.widgets.option_list import Option

from ..data.media import MediaCatalog, MediaKey, fit_image, heatmap
from .half_blocks import pixels_text, ramp
from .terminal_graphics import picture_widget

TABLE_ROWS = 500  # rows of a logged table shown (the rest: run.table(key) in Python)
KIND_MARK = {"image": "▣", "video": "▶", "audio": "♪", "table": "▦", "histogram": "▥"}
LABEL_W = 8  # the heatmap's step labels


def slider_text(steps: list[int | None], index: int, width: int) -> Text:
    """`step 40  ━━━━━●───────  3/10`: where the shown step lies among the key's steps."""
    if not steps:
        return Text("no steps", style="dim")
    step = steps[index]
    head = f"step {'—' if step is None else step}  "
    tail = f"  {index + 1}/{len(steps)}"
    bar = max(4, width - len(head) - len(tail))
    at = 0 if len(steps) == 1 else round(index * (bar - 1) / (len(steps) - 1))
    return Text.assemble((head, "bold"), ("━" * at, "cyan"), ("●", "bold cyan"), ("─" * (bar - at - 1), "dim"), tail)


class StepSlider(Static):
    """The step slider's line, drawn to its own width."""

    DEFAULT_CSS = "StepSlider { height: 1; width: 1fr; }"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps: list[int | None] = []
        self.index = 0

    def show(self, steps: list[int | None], index: int) -> None:
        self.steps, self.index = steps, index
        self.refresh()

    def render(self) -> Text:
        return slider_text(self.steps, self.index, max(12, self.size.width))


class MediaView(Static):
    """Draws what is asked: pixels (an image), counts (a heatmap) or a message."""

    DEFAULT_CSS = "MediaView { height: 1fr; width: 1fr; }"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pixels: np.ndarray | None = None
        self.grid: tuple[np.ndarray, list[int | None], tuple[float, float], int] | None = None
        self.message = ""
        self._cache: tuple[tuple, Text] | None = None  # (size, the text) of what is shown; show_* clear it

    def show_pixels(self, pixels: np.ndarray) -> None:
        self.pixels, self.grid, self.message, self._cache = pixels, None, "", None
        self.refresh()

    def show_heatmap(self, counts: np.ndarray, steps: list[int | None], span: tuple[float, float], at: int) -> None:
        self.pixels, self.grid, self.message, self._cache = None, (counts, steps, span, at), "", None
        self.refresh()

    def show_message(self, message: str) -> None:
        self.pixels, self.grid, self.message, self._cache = None, None, message, None
        self.refresh()

    def render(self) -> Text:
        """Drawn once per item and size (a 512x512 image in 100x40 cells takes ~30 ms)."""
        cols, rows = max(1, self.size.width), max(1, self.size.height)
        key = (cols, rows)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if self.pixels is not None:
            text = pixels_text(fit_image(self.pixels, cols, rows))
        elif self.grid is not None:
            text = self._heatmap(cols, rows)
        else:
            text = Text(self.message, style="dim")
        self._cache = (key, text)
        return text

    def _heatmap(self, cols: int, rows: int) -> Text:
        """A row of cells per step (up to 4 when there is room; two steps a row, sampled,
        when there are more than rows), each step scaled to its own peak."""
        counts, steps, (lo, hi), at = self.grid  # type: ignore[misc]
        if not len(steps):
            return Text("no histograms from this rank", style="dim")
        width, lines = max(4, cols - LABEL_W), max(1, rows - 1)
        peak = counts.max(axis=1, keepdims=True)
        norm = np.divide(counts, peak, out=np.zeros_like(counts), where=peak > 0)
        per_step = min(4, lines // len(steps))
        if per_step >= 1:  # each step its own rows of cells: both halves of a cell the same step
            ys = np.repeat(np.arange(len(steps)), 2 * per_step)
        else:
            ys = np.linspace(0, len(steps) - 1, 2 * lines).round().astype(int)
        xs = np.linspace(0, counts.shape[1] - 1, width).round().astype(int)
        body = pixels_text(ramp(norm[ys][:, xs]))
        out = Text(no_wrap=True, overflow="crop")
        shown: set[int] = set()
        for i, line in enumerate(body.split("\n")):
            first = int(ys[min(2 * i, len(ys) - 1)])
            here = at in ys[2 * i: 2 * i + 2] and at not in shown
            step = steps[first]
            label = "" if first in shown else f"{'—' if step is None else step}"
            shown.update(int(y) for y in ys[2 * i: 2 * i + 2])
            out.append(f"{label:>{LABEL_W - 2}}{'▶' if here else ' '} ", "bold cyan" if here else "dim")
            out.append_text(line)
            out.append("\n")
        out.append(" " * LABEL_W + f"{lo:.4g}".ljust(width - 8) + f"{hi:.4g}".rjust(8), "dim")
        return out


class MediaPanel(Horizontal):
    """The Media tab: keys on the left, the chosen one on the right (see module doc)."""

    BINDINGS = [
        Binding("right", "step(1)", "Next step", key_display="→"),
        Binding("left", "step(-1)", "Previous step", key_display="←"),
        Binding("full_stop", "step(1)", "Next step", show=False),
        Binding("comma", "step(-1)", "Previous step", show=False),
        Binding("shift+right", "step_end(1)", "Last step", show=False),
        Binding("shift+left", "step_end(-1)", "First step", show=False),
        Binding("r", "rank(1)", "Next rank"),
        Binding("R", "rank(-1)", "Previous rank", show=False),
    ]
    DEFAULT_CSS = """
    MediaPanel { height: 1fr; }
    MediaPanel #media-keys { width: 30; height: 1fr; }
    MediaPanel #media-right { width: 1fr; height: 1fr; padding: 0 1; }
    MediaPanel #media-title { height: 1; width: 1fr; }
    MediaPanel #media-table { height: 1fr; display: none; }
    MediaPanel.table #media-table { display: block; }
    MediaPanel.table #media-view { display: none; }
    MediaPanel #media-picture { display: none; width: auto; height: auto; max-height: 1fr; max-width: 1fr; }
    MediaPanel.picture #media-picture { display: block; }
    MediaPanel.picture #media-view { display: none; }
    """

    def __init__(self, run: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run = run
        self.catalog: MediaCatalog | None = None
        self.key: str | None = None
        self.step_index = 0
        self.rank = 0
        self.loads = 0  # items drawn: tests wait on it
        self.shown: tuple = ()  # (key, step, rank) last drawn

    def compose(self) -> ComposeResult:
        yield OptionList(id="media-keys")
        with Vertical(id="media-right"):
            yield Label("", id="media-title")
            yield StepSlider(id="media-slider")
            yield MediaView(id="media-view")
            picture = picture_widget()
            if picture is not None:  # the terminal draws pixels (widgets/terminal_graphics.py)
                yield picture(id="media-picture")
            yield DataTable(id="media-table", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one(MediaView).show_message("no media in this run (log_image, log_histogram, log_table)")

    # --- what the screen hands in ---------------------------------------------------------
    def show(self, catalog: MediaCatalog) -> None:
        if self.catalog is not None and catalog.size == self.catalog.size:
            return
        first = self.catalog is None
        entry = self.entry
        at_last = entry is not None and self.step_index == len(entry.steps) - 1
        self.catalog = catalog
        entry = self.entry
        if at_last and entry is not None:  # on the latest step: follow the new ones of a live run
            self.step_index = len(entry.steps) - 1
        options = self.query_one("#media-keys", OptionList)
        highlighted = options.highlighted
        options.clear_options()
        options.add_options([Option(Text.assemble((KIND_MARK.get(k.kind, "·") + " ", "cyan"), k.key), id=k.key)
                             for k in catalog.keys])
        if catalog.keys:
            options.highlighted = highlighted if highlighted is not None and highlighted < len(catalog.keys) else 0
        if first and catalog.keys:
            self._choose(catalog.keys[0].key, last=True)
        elif self.key is not None:
            self._load()  # new steps may have arrived: the slider and the heatmap follow

    @property
    def entry(self) -> MediaKey | None:
        return self.catalog.find(self.key) if self.catalog is not None and self.key is not None else None

    @property
    def step(self) -> int | None:
        entry = self.entry
        return entry.steps[self.step_index] if entry is not None and entry.steps else None

    # --- keys -------------------------------------------------------------------------------
    @on(OptionList.OptionHighlighted, "#media-keys")
    def _highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option.id is not None and event.option.id != self.key:
            self._choose(event.option.id, last=True)

    def _choose(self, key: str, last: bool) -> None:
        """Show `key`, at its last step (`last`) or the step nearest the one shown."""
        old = self.step
        self.key = key
        entry = self.entry
        if entry is None:
            return
        if last or old is None or old not in entry.steps:
            self.step_index = len(entry.steps) - 1
        else:
            self.step_index = entry.steps.index(old)
        if self.rank not in entry.ranks:
            self.rank = entry.ranks[0]
        self._load()

    def action_step(self, delta: int) -> None:
        entry = self.entry
        if entry is not None and entry.steps:
            self.step_index = max(0, min(len(entry.steps) - 1, self.step_index + delta))
            self._load()

    def action_step_end(self, direction: int) -> None:
        entry = self.entry
        if entry is not None and entry.steps:
            self.step_index = len(entry.steps) - 1 if direction > 0 else 0
            self._load()

    def action_rank(self, delta: int) -> None:
        entry = self.entry
        if entry is not None and entry.ranks:
            at = entry.ranks.index(self.rank) if self.rank in entry.ranks else 0
            self.rank = entry.ranks[(at + delta) % len(entry.ranks)]
            self._load()

    # --- drawing ------------------------------------------------------------------------------
    def _load(self) -> None:
        entry = self.entry
        if entry is None:
            return
        step, rank = self.step, self.rank
        ranks = f" (ranks {','.join(map(str, entry.ranks))}: r)" if len(entry.ranks) > 1 else ""
        self.query_one("#media-title", Label).update(Text.assemble(
            (entry.key, "bold"), f"  {entry.kind}  ", ("rank ", "dim"), (str(rank), "bold"),
            (f"{ranks}  ← → step", "dim")))
        self.query_one(StepSlider).show(entry.steps, self.step_index)
        self.set_class(entry.kind == "table", "table")
        if entry.kind not in ("image", "video"):
            self.set_class(False, "picture")
        view = self.query_one(MediaView)
        if entry.kind == "histogram":
            counts, steps, span = heatmap(self.catalog.histograms.get(entry.key, []), rank)  # type: ignore[union-attr]
            at = steps.index(step) if step in steps else -1
            view.show_heatmap(counts, steps, span, at)
            self._drawn((entry.key, step, rank))
            return
        if (step, rank) not in entry.at:
            self.set_class(False, "picture")
            view.show_message(f"nothing from rank {rank} at step {step}: r for another rank")
            self._drawn((entry.key, step, rank))
            return
        self.run_worker(lambda: self._read(entry.key, entry.kind, step, rank), thread=True,
                        exclusive=True, group="media-read")

    def _read(self, key: str, kind: str, step: int | None, rank: int) -> None:
        try:
            if kind in ("image", "video"):
                result: Any = self.run.read_media(key, step, rank, as_="numpy")
            elif kind == "table":
                result = self.run.table(key, step, rank)
            elif kind == "audio":
                samples, rate = self.run.read_media(key, step, rank, as_="numpy")
                result = f"audio: {len(samples):,} samples at {rate:,} Hz ({len(samples) / rate:.2f} s)"
            else:
                result = f"{kind}: run.read_media({key!r}, step={step}, rank={rank}) in Python"
        except ImportError as exc:
            result = f"cannot show {kind}s here: {exc} (pip install 'expman-tracker[media]')"
        except Exception as exc:  # an unreadable item says why, the tab stays usable
            result = f"could not read {key!r} at step {step}, rank {rank}: {exc}"
        try:
            self.app.call_from_thread(self._show_item, (key, step, rank), kind, result)
        except Exception:  # the app is closing
            pass

    def _show_item(self, which: tuple, kind: str, result: Any) -> None:
        if which != (self.key, self.step, self.rank) or not self.is_mounted:
            return  # the user moved on meanwhile
        view = self.query_one(MediaView)
        pictures = list(self.query("#media-picture"))
        self.set_class(bool(pictures) and kind in ("image", "video") and not isinstance(result, str), "picture")
        if isinstance(result, str):
            self.set_class(False, "table")
            view.show_message(result)
        elif kind == "table":
            self._show_table(result)
        elif pictures:
            from PIL import Image

            frame = result[0] if result.ndim == 4 else result  # a video: its first frame
            pictures[0].image = Image.fromarray(frame)
        else:
            view.show_pixels(result)
        self._drawn(which)

    def _show_table(self, table: Any) -> None:
        grid = self.query_one("#media-table", DataTable)
        grid.clear(columns=True)
        for name in table.column_names:
            grid.add_column(name, key=name)
        for row in table.slice(0, TABLE_ROWS).to_pylist():
            grid.add_row(*[("—" if v is None else str(v)) for v in row.values()])
        if table.num_rows > TABLE_ROWS:
            grid.add_row(Text(f"… {table.num_rows - TABLE_ROWS:,} more rows", style="dim"),
                         *[""] * (len(table.column_names) - 1))

    def _drawn(self, which: tuple) -> None:
        self.shown = which
        self.loads += 1

    def focus_keys(self) -> None:
        self.query_one("#media-keys", OptionList).focus()

