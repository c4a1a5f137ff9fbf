"""Media on the collector: a finished media transfer in, an encoded file and an index row out.

A rank sends media as an artifact transfer whose chunk 0 carries a descriptor
(docs/protocol.md, "Media"). The descriptor is checked when the transfer begins
(`check_descriptor`), so a bad one is refused before any bytes move. When the last chunk
has arrived and hashes right, `encode` turns the raw payload into what is stored: a PNG
(Pillow), a WAV, a Parquet file, or a histogram row (numpy). This runs here, in the
collector process, so the training process never pays for it in time or GIL.

`MediaStore` keeps one run's index rows from this collector (docs/storage.md, "Media"):
each row goes first to an append-only journal (`media/.journal/<writer>.jsonl`, fsynced
before the ack), then, in batches, into Parquet parts named by their row range; a part
is written whole and renamed into place before the journal is cut, and on start rows the
parts already hold are skipped, so a crash in between neither loses nor doubles a row.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expman._errors import ProtocolError
from expman._storage.crypto import MasterKey, new_header
from expman._storage.layout import (
    ARTIFACTS_DIR,
    HISTOGRAMS_DIR,
    MEDIA_DIR,
    MEDIA_INDEX_DIR,
    MEDIA_JOURNAL_DIR,
    histograms_schema,
    media_index_schema,
    media_part_name,
    media_part_range,
    object_name,
)
from expman._wire.limits import MAX_KEY as MAX_KEY_CHARS

ROLL_ROWS = 2000  # journal rows that make a Parquet part
ROLL_AGE_S = 10.0  # or the age of the oldest journal row
ROLL_BYTES = 16 * 1024 * 1024  # or their size as JSON (histograms of 10k bins are ~200 KB a row)
MAX_MEDIA_BYTES = 512 * 1024 * 1024  # raw payload of one item
MAX_PIXELS = 100_000_000
_DTYPES = {"image": ("uint8", "float32"), "video": ("uint8", "float32"), "audio": ("int16", "float32")}
_ENCODINGS = {"image": ("raw", "file"), "video": ("raw", "file"), "audio": ("raw",), "table": ("arrow-ipc",),
              "histogram": ("values", "edges-counts")}
_LAYOUTS = {"image": ("HW", "HWC", "CHW", "NHWC", "NCHW"), "video": ("THW", "THWC", "TCHW", "NTHWC", "NTCHW")}
_VIDEO_FILES = ("gif", "png", "apng", "webp", "mp4", "webm", "mov", "mkv", "avi")


def _bad(detail: str) -> ProtocolError:
    return ProtocolError("bad-values", detail)


def check_descriptor(desc: dict[str, Any], size: int) -> dict[str, Any]:
    """The descriptor, checked against the payload's size; ProtocolError if it is refused."""
    kind, key, step = desc.get("kind"), desc.get("key"), desc.get("step")
    if kind not in _ENCODINGS:
        raise _bad(f"media kind must be one of {sorted(_ENCODINGS)}, got {kind!r}")
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or "\x00" in key:
        raise _bad(f"media key must be a non-empty string of at most {MAX_KEY_CHARS} characters")
    if step is not None and (type(step) is not int or not -(2**63) <= step < 2**63):
        raise _bad(f"media {key!r}: step must be an int or nil")
    caption = desc.get("caption")
    if caption is not None and (not isinstance(caption, str) or len(caption) > 4096):
        raise _bad(f"media {key!r}: caption must be a string of at most 4096 characters")
    encoding = desc.get("encoding")
    if encoding not in _ENCODINGS[kind]:
        raise _bad(f"{kind} {key!r}: encoding must be one of {_ENCODINGS[kind]}, got {encoding!r}")
    if size > MAX_MEDIA_BYTES:
        raise _bad(f"{kind} {key!r}: {size} bytes is over the {MAX_MEDIA_BYTES}-byte limit for one item")
    if kind == "video":
        fps = desc.get("fps")
        if not isinstance(fps, float) or not 0 < fps <= 1000:
            raise _bad(f"video {key!r}: fps must be a float in (0, 1000]")
        if encoding == "file" and desc.get("format") not in _VIDEO_FILES:
            raise _bad(f"video {key!r}: format must be one of {_VIDEO_FILES}")
    if encoding == "raw":
        _check_raw(kind, key, desc, size)
    elif encoding == "values":
        bins = desc.get("bins")
        if type(bins) is not int or not 1 <= bins <= 10_000 or size % 8:
            raise _bad(f"histogram {key!r}: bins must be 1..10000 and values whole float64s")
    elif encoding == "edges-counts" and (size % 8 or size < 24 or (size // 8) % 2 == 0):
        raise _bad(f"histogram {key!r}: edges and counts must be n+1 and n float64s")
    return desc


def _check_raw(kind: str, key: str, desc: dict[str, Any], size: int) -> None:
    dtype, shape = desc.get("dtype"), desc.get("shape")
    if dtype not in _DTYPES[kind]:
        raise _bad(f"{kind} {key!r}: dtype must be one of {_DTYPES[kind]}, got {dtype!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n > 0 for n in shape):
        raise _bad(f"{kind} {key!r}: shape must be a list of positive ints")
    itemsize = 1 if dtype == "uint8" else (2 if dtype == "int16" else 4)
    if math.prod(shape) * itemsize != size:
        raise _bad(f"{kind} {key!r}: shape {shape} of {dtype} is not {size} bytes")
    if kind in _LAYOUTS:
        layout = desc.get("layout")
        if layout not in _LAYOUTS[kind] or len(layout) != len(shape):
            raise _bad(f"{kind} {key!r}: layout must be one of {_LAYOUTS[kind]} matching shape {shape}")
        if "C" in layout and shape[layout.index("C")] not in (1, 3, 4):
            raise _bad(f"{kind} {key!r}: 1, 3 or 4 channels")
        if math.prod(shape) > MAX_PIXELS * 4:
            raise _bad(f"{kind} {key!r}: over {MAX_PIXELS} pixels")
    else:
        rate = desc.get("sample_rate")
        if len(shape) != 2 or type(rate) is not int or not 0 < rate <= 1_000_000:
            raise _bad(f"audio {key!r}: shape must be [frames, channels] and sample_rate 1..1000000")


@dataclass
class Encoded:
    """What `encode` made: the bytes to store (None for a histogram) and the index row."""

    data: bytes | None
    row: dict[str, Any]
    table: str  # "index" or "histograms"


def encode(desc: dict[str, Any], payload: bytes) -> Encoded:
    """Raw payload -> stored form. ProtocolError("artifact-error") when it cannot be read."""
    kind, key = desc["kind"], desc["key"]
    try:
        if kind == "image":
            return _encode_image(desc, payload)
        if kind == "video":
            return _encode_video(desc, payload)
        if kind == "audio":
            return _encode_audio(desc, payload)
        if kind == "table":
            return _encode_table(payload)
        return _encode_histogram(desc, payload)
    except ProtocolError:
        raise
    except ImportError as exc:
        raise ProtocolError("artifact-error", f"{kind} {key!r}: the collector lacks {exc.name} "
                                              f"(pip install 'expman[media]')") from None
    except Exception as exc:  # whatever a codec raises on bad content: refuse this item only
        raise ProtocolError("artifact-error", f"{kind} {key!r} could not be encoded: {exc}") from None


def _encode_image(desc: dict[str, Any], payload: bytes) -> Encoded:
    from PIL import Image

    if desc["encoding"] == "file":
        with Image.open(io.BytesIO(payload)) as img:
            fmt, (width, height), bands = (img.format or "unknown").lower(), img.size, len(img.getbands())
        return Encoded(payload, {"format": fmt, "width": width, "height": height, "channels": bands}, "index")
    array = _hwc(desc, payload)
    height, width, channels = array.shape
    out = io.BytesIO()
    _pil(array).save(out, format="PNG", compress_level=1)  # lossless either way; level 1 is faster than 6
    return Encoded(out.getvalue(), {"format": "png", "width": width, "height": height, "channels": channels},
                   "index")


def _hwc(desc: dict[str, Any], payload: bytes) -> Any:
    """The payload as uint8 ([T,] H, W, C): channels last, a batch (N) tiled in a grid,
    floats in [0, 1] scaled to 0..255."""
    import numpy as np

    array = np.frombuffer(payload, dtype=desc["dtype"]).reshape(desc["shape"])
    layout = desc["layout"]
    if "C" not in layout:
        array, layout = array[..., None], layout + "C"
    if layout.endswith("CHW"):
        array = np.moveaxis(array, -3, -1)
    if layout.startswith("N"):
        array = np.stack([_grid(array[:, t]) for t in range(array.shape[1])]) if "T" in layout else _grid(array)
    if array.dtype != np.uint8:
        array = (np.clip(np.nan_to_num(array), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return array


def _pil(frame: Any) -> Any:
    import numpy as np
    from PIL import Image

    channels = frame.shape[-1]
    return Image.fromarray(frame[..., 0] if channels == 1 else np.ascontiguousarray(frame),
                           mode={1: "L", 3: "RGB", 4: "RGBA"}[channels])


def _encode_video(desc: dict[str, Any], payload: bytes) -> Encoded:
    """Frames as an animated PNG (lossless; browsers play it); a file as it is."""
    fps = desc["fps"]
    if desc["encoding"] == "file":
        row: dict[str, Any] = {"format": desc["format"], "fps": fps}
        if desc["format"] in ("gif", "png", "apng", "webp"):  # Pillow reads these: check and measure them
            from PIL import Image

            with Image.open(io.BytesIO(payload)) as img:
                row.update(width=img.size[0], height=img.size[1], frames=getattr(img, "n_frames", 1))
        return Encoded(payload, row, "index")
    array = _hwc(desc, payload)
    count, height, width, channels = array.shape
    frames = [_pil(f) for f in array]
    out = io.BytesIO()
    frames[0].save(out, format="PNG", save_all=True, append_images=frames[1:], duration=1000.0 / fps, loop=0,
                   compress_level=1, disposal=0, blend=0)
    return Encoded(out.getvalue(), {"format": "apng", "width": width, "height": height, "channels": channels,
                                    "frames": count, "fps": fps}, "index")


def _grid(batch: Any) -> Any:
    """N images (N, H, W, C) tiled in rows of ceil(sqrt(N)), as TensorBoard's add_images does."""
    import numpy as np

    n, h, w, c = batch.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h, cols * w, c), dtype=batch.dtype)
    for i in range(n):
        r, col = divmod(i, cols)
        out[r * h:(r + 1) * h, col * w:(col + 1) * w] = batch[i]
    return out


def _encode_audio(desc: dict[str, Any], payload: bytes) -> Encoded:
    from expman._storage import wav

    frames, channels = desc["shape"]
    rate = desc["sample_rate"]
    return Encoded(wav.encode(payload, desc["dtype"], channels, rate),
                   {"format": "wav", "channels": channels, "sample_rate": rate, "frames": frames}, "index")


def _encode_table(payload: bytes) -> Encoded:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.ipc.open_stream(payload).read_all()
    table.validate(full=True)  # a hostile stream must fail here, not inside the Parquet writer
    out = pa.BufferOutputStream()
    pq.write_table(table, out)
    return Encoded(out.getvalue().to_pybytes(), {"format": "parquet", "rows": table.num_rows,
                                                 "columns": table.num_columns}, "index")


def _encode_histogram(desc: dict[str, Any], payload: bytes) -> Encoded:
    import numpy as np

    values = np.frombuffer(payload, dtype="<f8")
    if desc["encoding"] == "edges-counts":
        n = (len(values) - 1) // 2
        edges, counts = values[:n + 1], values[n + 1:]
        if not (np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0) and np.all(np.isfinite(counts))):
            raise _bad(f"histogram {desc['key']!r}: edges must be finite and increasing, counts finite")
        total = float(counts.sum())
        stats = {"count": int(total) if total.is_integer() else None, "nonfinite": None,
                 "min": None, "max": None, "sum": None}
    else:
        finite = values[np.isfinite(values)]
        counts, edges = np.histogram(finite, bins=desc["bins"])
        if not np.all(np.isfinite(edges)):
            raise _bad(f"histogram {desc['key']!r}: the values' range overflows float64")
        stats = {"count": len(finite), "nonfinite": len(values) - len(finite),
                 "min": float(finite.min()) if len(finite) else None,
                 "max": float(finite.max()) if len(finite) else None, "sum": float(finite.sum())}
    return Encoded(None, {"edges": edges.astype(float).tolist(), "counts": counts.astype(float).tolist(), **stats},
                   "histograms")


def write_object(artifacts_dir: Path, staging: Path, data: bytes, container: bool, master: MasterKey | None,
                 compress: bool, chunk: int) -> tuple[str, str, int]:
    """Store `data` in the artifact object store (sealed when `container`); returns
    (object path relative to the artifacts folder, sha256, stored bytes). Durable on return."""
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    relative = object_name(digest, container)
    target = artifacts_dir / relative
    if not target.exists():
        staging.parent.mkdir(parents=True, exist_ok=True)
        with open(staging, "wb") as fh:
            if container:
                header = new_header(master, compress, chunk)
                fh.write(header.raw)
                total = max(1, -(-len(data) // chunk))
                for i in range(total):
                    fh.write(header.seal(i, data[i * chunk:(i + 1) * chunk], i == total - 1))
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
        _fsync_dir(target.parent)
    return relative, digest, target.stat().st_size


class MediaStore:
    """One run's media index rows from this collector: journal first, Parquet parts after."""

    def __init__(self, run_dir: Path, writer: str) -> None:
        self.dir = run_dir / MEDIA_DIR
        self.writer = writer
        self.journal_path = self.dir / MEDIA_JOURNAL_DIR / f"{writer}.jsonl"
        self._pending: list[dict[str, Any]] = []  # rows in the journal, not in a part yet
        self._unsynced: list[str] = []
        self._oldest: float | None = None
        self._pending_bytes = 0
        self._fh: Any = None
        self.next_seq = 0
        self._recover()

    def _recover(self) -> None:
        done = -1
        for sub in (MEDIA_INDEX_DIR, HISTOGRAMS_DIR):
            for name in os.listdir(self.dir / sub) if (self.dir / sub).is_dir() else []:
                found = media_part_range(name)
                if found and found[0] == self.writer:
                    done = max(done, found[2])
        self.next_seq = done + 1
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):  # a torn last line (its ack was never sent): cut it, so appends start clean
            with open(self.journal_path, "r+b") as fh:
                fh.truncate(len(whole))
                os.fsync(fh.fileno())
        for line in whole.decode("utf-8", "replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("seq", -1) > done:
                self._pending.append(entry)
                self.next_seq = max(self.next_seq, entry["seq"] + 1)
        if self._pending:
            self._oldest = time.time()

    def add(self, table: str, row: dict[str, Any]) -> None:
        entry = {"table": table, "seq": self.next_seq, **row}
        self.next_seq += 1
        self._pending.append(entry)
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        self._unsynced.append(line)
        self._pending_bytes += len(line)
        if self._oldest is None:
            self._oldest = time.time()

    def due(self) -> bool:
        return bool(self._unsynced) or (bool(self._pending) and time.time() - (self._oldest or 0) >= ROLL_AGE_S)

    def sync(self) -> None:
        """Journal rows durable (before the acks); a Parquet part when enough have gathered."""
        if self._unsynced:
            if self._fh is None:
                self.journal_path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.journal_path, "a", encoding="utf-8")
            self._fh.write("".join(self._unsynced))
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._unsynced.clear()
        if self._pending and (len(self._pending) >= ROLL_ROWS or self._pending_bytes >= ROLL_BYTES
                              or time.time() - (self._oldest or 0) >= ROLL_AGE_S):
            self.roll()

    def roll(self) -> None:
        """Write the pending rows as Parquet parts, then cut the journal."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        first, last = self._pending[0]["seq"], self._pending[-1]["seq"]
        for table, sub, schema in (("index", MEDIA_INDEX_DIR, media_index_schema()),
                                   ("histograms", HISTOGRAMS_DIR, histograms_schema())):
            rows = [_row(e) for e in self._pending if e["table"] == table]
            if not rows:
                continue
            folder = self.dir / sub
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / media_part_name(self.writer, first, last)
            tmp = folder / f".{target.name}.tmp"
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            _fsync_dir(folder)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.journal_path.unlink(missing_ok=True)
        self._pending.clear()
        self._pending_bytes = 0
        self._oldest = None

    def close(self) -> None:
        self.sync()
        self.roll()


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in entry.items() if k != "table"}
    row["time"] = _utc(row["time"])
    return row


def _utc(ts: float) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def object_path(relative: str) -> str:
    """An object's path as the media index's `file` column holds it: relative to the run."""
    return f"{ARTIFACTS_DIR}/{relative}"


# --- the hooks collector/_artifacts.py calls -------------------------------------------------

def encode_transfer(t: Any, keys: Any) -> Encoded:
    """A complete, hash-checked media transfer's staged payload, encoded. Memory: the payload
    and its encoded form, for one item at a time."""
    from expman._storage.crypto import read_plaintext

    with open(t.part, "rb") as fh:
        payload = b"".join(read_plaintext(fh, keys)) if t.container else fh.read()
    return encode(t.media, payload)


def store_encoded(store: Any, t: Any) -> None:
    """Put an encoded media item in the object store and its row in the journal (fsynced by
    the store's sync, before the ack). The staged raw payload is dropped."""
    t.fh.close()
    encoded: Encoded = t.encoded
    desc = t.media
    row: dict[str, Any] = {
        "key": desc["key"], "step": desc.get("step"), "rank": t.rank, "host": t.host, "time": t.logged_at,
    }
    if encoded.data is not None:
        master = store.service.master_key() if t.encrypted else None
        staging = store.incoming / f"{t.key}.media"
        relative, digest, _stored = write_object(store.dir, staging, encoded.data, t.container, master,
                                                 t.compression == "zstd", t.chunk)
        row.update(kind=desc["kind"], caption=desc.get("caption"), file=object_path(relative), sha256=digest,
                   size=len(encoded.data), encrypted=t.encrypted)
    row.update(encoded.row)
    t.part.unlink(missing_ok=True)
    if t.meta is not None:
        t.meta.unlink(missing_ok=True)
    store.transfers.pop(t.key, None)
    if store.media is None:
        store.media = MediaStore(store.dir.parent, store.writer or "collector")
    store.media.add(encoded.table, row)
