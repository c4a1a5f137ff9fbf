"""Reading a run's media back: the index and histograms as Arrow, one item as bytes, a PIL
image, a numpy array or an Arrow table (behind `Run.media()` and friends).

The index is every writer's Parquet parts under `media/index/` plus the rows still in
the collectors' journals (`media/.journal/*.jsonl`), so a live run shows everything the
collector acknowledged. Items are read through the artifact reader: checked against
their SHA-256, decrypted with the master key when the run encrypts artifacts.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Iterable

from expman._errors import ExpmanError
from expman._storage.files import LOCAL, Files
from expman._storage.layout import (
    HISTOGRAMS_DIR,
    MEDIA_DIR,
    MEDIA_INDEX_DIR,
    MEDIA_JOURNAL_DIR,
    ArtifactRecord,
    check_media_file,
    histograms_schema,
    media_index_schema,
    media_part_range,
)

if TYPE_CHECKING:
    import pyarrow as pa

AS_CHOICES = (None, "bytes", "pil", "numpy", "arrow")


def _keys(keys: str | Iterable[str] | None) -> list[str] | None:
    return [keys] if isinstance(keys, str) else (list(keys) if keys is not None else None)


def _rows(run_dir: PurePath, files: Files, sub: str, journal_table: str, schema: pa.Schema,
          keys: str | Iterable[str] | None) -> pa.Table:
    import pyarrow as pa

    folder = run_dir / MEDIA_DIR / sub
    wanted = _keys(keys)
    filters = [("key", "in", wanted)] if wanted is not None else None
    tables, done = [], {}
    for name in sorted(files.names(folder)):
        found = media_part_range(name)
        if found is None or name.startswith("."):
            continue
        try:
            tables.append(files.read_parquet(folder / name, schema=schema, filters=filters))
        except FileNotFoundError:
            continue
        done[found[0]] = max(done.get(found[0], -1), found[2])
    journal_dir = run_dir / MEDIA_DIR / MEDIA_JOURNAL_DIR
    pending = []
    for name in sorted(files.names(journal_dir)):
        if not name.endswith(".jsonl"):
            continue
        writer = name[: -len(".jsonl")]
        try:
            text = files.read_text(journal_dir / name)
        except FileNotFoundError:  # rolled into a part while we listed: the part has the rows
            continue
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if entry.get("table") == journal_table and entry.get("seq", -1) > done.get(writer, -1) and (
                    wanted is None or entry.get("key") in wanted):
                entry.pop("table")
                entry["time"] = _utc(entry["time"])
                pending.append(entry)
    if pending:
        tables.append(pa.Table.from_pylist(pending, schema=schema))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return _once(table).sort_by([("key", "ascending"), ("step", "ascending"), ("rank", "ascending"),
                                 ("seq", "ascending")])


def _once(table: pa.Table) -> pa.Table:
    """One row per logged item. A collector that stored an item and crashed before its ack
    stores it again when the rank resends; both rows carry the rank's call time, so
    (key, step, rank, host, time) names the item."""
    import pyarrow as pa

    if table.num_rows < 2:
        return table
    numbered = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    first = numbered.group_by(["key", "step", "rank", "host", "time"], use_threads=False).aggregate([("_row", "min")])
    if first.num_rows == table.num_rows:
        return table
    return table.take(first["_row_min"].combine_chunks().sort())


def _utc(ts: float) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def index(run_dir: PurePath, files: Files = LOCAL, keys: str | Iterable[str] | None = None) -> pa.Table:
    """Every image, audio clip and table of the run: one row each (docs/storage.md, "Media")."""
    return _rows(run_dir, files, MEDIA_INDEX_DIR, "index", media_index_schema(), keys)


def histograms(run_dir: PurePath, files: Files = LOCAL, keys: str | Iterable[str] | None = None) -> pa.Table:
    """Every histogram of the run: key, step, rank, edges, counts and the values' stats."""
    return _rows(run_dir, files, HISTOGRAMS_DIR, "histograms", histograms_schema(), keys)


def find(run_dir: PurePath, files: Files, key: str, step: int | None, rank: int) -> dict[str, Any]:
    """The index row of `key` from `rank` at `step` (None: the latest step); a later row for
    the same (key, step, rank) replaces an earlier one."""
    rows = index(run_dir, files, key).to_pylist()
    if not rows:
        known = sorted(set(index(run_dir, files).column("key").to_pylist()))
        sample = ", ".join(known[:8]) + (" ..." if len(known) > 8 else "")
        raise ExpmanError(f"run {run_dir.name} has no media {key!r}" + (f" (it has: {sample})" if known else ""))
    mine = [r for r in rows if r["rank"] == rank]
    if not mine:
        ranks = sorted({r["rank"] for r in rows})
        raise ExpmanError(f"media {key!r} has nothing from rank {rank} (ranks: {ranks})")
    if step is not None:
        at = [r for r in mine if r["step"] == step]
        if not at:
            steps = sorted({r["step"] for r in mine if r["step"] is not None})
            shown = ", ".join(map(str, steps[:10])) + (" ..." if len(steps) > 10 else "")
            raise ExpmanError(f"media {key!r} (rank {rank}) has no step {step} (steps: {shown})")
        mine = at
    return max(mine, key=lambda r: (r["step"] if r["step"] is not None else -1, r["seq"]))


def read_bytes(run_dir: PurePath, files: Files, row: dict[str, Any], key_file: str | os.PathLike[str] | None) -> bytes:
    from expman._reader.artifacts import iter_content

    file = check_media_file(row["file"], row["sha256"])
    record = ArtifactRecord(
        name=f"media/{row['key']}", size=row["size"], sha256=row["sha256"], time=str(row["time"]),
        rank=row["rank"], host=row["host"] or "", encrypted=bool(row["encrypted"]), compression="none",
        stored=0, object=file.split("/", 1)[1],
    )
    return b"".join(iter_content(run_dir, record, key_file, files))


def convert(row: dict[str, Any], data: bytes, as_: str | None) -> Any:
    """`data` as asked: bytes (None or "bytes"), "pil" (images), "numpy" (images: HxWxC or
    HxW uint8; videos Pillow reads: TxHxWxC or TxHxW; audio: (samples, sample_rate)),
    "arrow" (tables)."""
    if as_ not in AS_CHOICES:
        raise ValueError(f"as_ must be one of {AS_CHOICES}, got {as_!r}")
    kind = row["kind"]
    if as_ in (None, "bytes"):
        return data
    if kind == "image" and as_ in ("pil", "numpy"):
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        if as_ == "pil":
            return img
        import numpy as np

        return np.asarray(img)
    if kind == "video" and as_ == "numpy" and row["format"] in ("apng", "png", "gif", "webp"):
        import numpy as np
        from PIL import Image, ImageSequence

        frames = []
        with Image.open(io.BytesIO(data)) as img:
            for frame in ImageSequence.Iterator(img):
                # Pillow stores repeated frames once with their durations summed: expand them again
                repeat = round(frame.info.get("duration", 0) * row["fps"] / 1000) if row["format"] == "apng" else 1
                frames += [np.asarray(frame.copy())] * max(1, repeat)
        return np.stack(frames)
    if kind == "audio" and as_ == "numpy":
        from expman._storage import wav

        samples, rate = wav.decode(data)
        return (samples[:, 0] if samples.shape[1] == 1 else samples), rate
    if kind == "table" and as_ == "arrow":
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data))
    raise ValueError(f"media {row['key']!r} is {kind}; as_={as_!r} does not apply to it")
