"""A run's media as the Media tab shows them: which keys there are (images, videos, tables,
audio, histograms), at which steps and ranks; one image scaled to a box of cells; a
histogram key over steps as a grid of counts for a heatmap.

Reads go through `expman.Run` (`media()`, `histograms()`, `read_media()`); nothing here
touches Textual, so it runs on the screen's worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expman._storage.layout import HISTOGRAMS_DIR, MEDIA_DIR, MEDIA_INDEX_DIR, MEDIA_JOURNAL_DIR

from .store import Store

HEATMAP_BINS = 48  # columns of a histogram heatmap: the steps' histograms re-binned onto one grid
HEATMAP_STEPS = 64  # rows at most: steps past that are sampled evenly (first and last kept)
KIND_ORDER = ("image", "video", "histogram", "table", "audio")  # the list's order: what users look at most first


@dataclass
class MediaKey:
    """One key of the run's media: its kind and the (step, rank) pairs logged under it."""

    key: str
    kind: str  # image, video, audio, table, histogram
    steps: list[int | None] = field(default_factory=list)  # sorted, each once (None first)
    ranks: list[int] = field(default_factory=list)
    at: set[tuple[int | None, int]] = field(default_factory=set)  # (step, rank) present


@dataclass
class MediaCatalog:
    """Every media key of a run, and histograms' rows (key -> list of (step, rank, edges, counts))."""

    keys: list[MediaKey]
    histograms: dict[str, list[tuple[int | None, int, list[float], list[float]]]]
    size: tuple[int, int] = (0, 0)  # (index rows, histogram rows): unchanged means nothing new

    def find(self, key: str) -> MediaKey | None:
        return next((k for k in self.keys if k.key == key), None)


def _step_sort(step: int | None) -> tuple[int, int]:
    return (0, 0) if step is None else (1, step)


class MediaSource:
    """A run's catalog, read again only when the media folders changed (a part or a journal
    written): a live run's Run screen asks every few polls, and most asks find nothing new."""

    def __init__(self, run: Any, store: Store | None = None) -> None:
        self.run = run
        self.store = store or Store.local(run.path)
        self._signature: tuple = ()

    def read(self) -> MediaCatalog | None:
        """The catalog if something changed since the last read, else None."""
        signature = _signature(self.run.path / MEDIA_DIR, self.store)
        if not signature or signature == self._signature:
            return None
        catalog = read_catalog(self.run)
        self._signature = signature
        return catalog


def _signature(media: Any, store: Store) -> tuple:
    """(folder, name, size, mtime) of every file in the media folders; () when there are none."""
    folders = (media / MEDIA_INDEX_DIR, media / HISTOGRAMS_DIR, media / MEDIA_JOURNAL_DIR)
    return tuple(sorted((sub.name, *entry) for sub in folders for entry in store.entries(sub)))


def read_catalog(run: Any) -> MediaCatalog | None:
    """The run's media keys, or None when the run has no media folder (most runs: no read)."""
    if isinstance(run.path, Path) and not (run.path / MEDIA_DIR).is_dir():
        return None  # on a bucket the caller asks only once the media folders hold files
    index = run.media().select(["key", "kind", "step", "rank"]).to_pylist()
    hist = run.histograms().select(["key", "step", "rank", "edges", "counts"]).to_pylist()
    found: dict[str, MediaKey] = {}
    for row in index:
        entry = found.setdefault(row["key"], MediaKey(row["key"], row["kind"]))
        entry.at.add((row["step"], row["rank"]))
    histograms: dict[str, list] = {}
    for row in hist:
        entry = found.setdefault(row["key"], MediaKey(row["key"], "histogram"))
        entry.at.add((row["step"], row["rank"]))
        histograms.setdefault(row["key"], []).append((row["step"], row["rank"], row["edges"], row["counts"]))
    for entry in found.values():
        entry.steps = sorted({s for s, _ in entry.at}, key=_step_sort)
        entry.ranks = sorted({r for _, r in entry.at})
    return MediaCatalog(sorted(found.values(), key=_list_order),
                        histograms, (len(index), len(hist)))


def _list_order(entry: MediaKey) -> tuple[int, str]:
    return (KIND_ORDER.index(entry.kind) if entry.kind in KIND_ORDER else len(KIND_ORDER), entry.key)


def fit_image(pixels: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """`pixels` (HxW, HxWxC, or TxHxWxC for a video: its first frame) as RGB uint8 scaled to
    fit `cols` x `2*rows` pixels (a half-block cell shows two), aspect kept, never enlarged
    past 4x."""
    from PIL import Image

    arr = np.asarray(pixels)
    if arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        arr = arr[0]  # a video: its first frame
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    img = Image.fromarray(arr.astype(np.uint8) if arr.dtype != np.uint8 else arr)
    if img.mode == "RGBA":  # on black, as the terminal's background is most often dark
        back = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(back, img)
    img = img.convert("RGB")
    width, height = img.size
    scale = min(cols / width, 2 * rows / height, 4.0)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX
    return np.asarray(img.resize(size, resample))


def heatmap(rows: list[tuple[int | None, int, list[float], list[float]]], rank: int,
            bins: int = HEATMAP_BINS, max_steps: int = HEATMAP_STEPS) -> tuple[np.ndarray, list[int | None], tuple[float, float]]:
    """One rank's histograms over steps as a (steps, bins) array of counts on one grid of
    `bins` equal bins over the union of their edges (each step's counts are spread over the
    grid in proportion to the overlap of its bins); the steps shown; the value range."""
    mine = sorted((r for r in rows if r[1] == rank), key=lambda r: _step_sort(r[0]))
    if not mine:
        return np.zeros((0, bins)), [], (0.0, 0.0)
    if len(mine) > max_steps:
        picks = np.unique(np.linspace(0, len(mine) - 1, max_steps).round().astype(int))
        mine = [mine[i] for i in picks]
    lo = min(float(r[2][0]) for r in mine)
    hi = max(float(r[2][-1]) for r in mine)
    if not hi > lo:
        hi = lo + 1.0
    grid = np.linspace(lo, hi, bins + 1)
    out = np.zeros((len(mine), bins))
    for i, (_step, _rank, edges, counts) in enumerate(mine):
        e = np.asarray(edges, dtype=float)
        c = np.asarray(counts, dtype=float)
        # cumulative count at each grid edge, linear inside each source bin
        cum = np.concatenate([[0.0], np.cumsum(c)])
        at = np.interp(grid, e, cum, left=0.0, right=cum[-1])
        out[i] = np.diff(at)
    return out, [r[0] for r in mine], (lo, hi)
