"""Media from a training rank: images, videos, histograms, tables, audio, figures.

The call runs on the training thread, so it only copies the data into bytes (one memcpy
of the array, or a reference to a file) and queues it; the bytes travel as an artifact
transfer (expman/_rank/artifacts.py) with a media descriptor on chunk 0
(docs/protocol.md, "Media"). Encoding (PNG, WAV, Parquet) and binning raw histogram
values happen in the collector process (collector/_media.py), which shares no GIL with
training. Two exceptions, said where they happen: a matplotlib figure is rendered to PNG
here (a figure is not safe to hand to another thread), and a table is converted to Arrow
here (pandas, polars and lists of dicts only exist in this process).

numpy is imported on first use, pyarrow only by `log_table`; Pillow never on this side.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import logging
from typing import TYPE_CHECKING, Any

from expman._rank.artifacts import pump_for
from expman._rank.logged_files import refuse_after_finish
from expman._rank.values import check_key, coerce_step
from expman._errors import ArtifactNameError
from expman._storage.artifact_names import normalize_name

if TYPE_CHECKING:
    from expman._rank.channel import RunChannel
    from expman._rank.sender import Sender

log = logging.getLogger("expman")

IMAGE_LAYOUTS = ("HW", "HWC", "CHW", "NHWC", "NCHW")
VIDEO_LAYOUTS = ("THW", "THWC", "TCHW", "NTHWC", "NTCHW")  # N videos are tiled in a grid, frame by frame
VIDEO_FILES = ("gif", "png", "apng", "webp", "mp4", "webm", "mov", "mkv", "avi")
MAX_CAPTION = 4096


_pillow_checked = False


def _check_pillow(kind: str) -> None:
    """Warn once when Pillow is missing here: a local collector (same environment) then
    refuses every image and video. Looks it up without importing it."""
    global _pillow_checked
    if not _pillow_checked:
        _pillow_checked = True
        import importlib.util

        if importlib.util.find_spec("PIL") is None:
            log.warning("expman: Pillow is not installed, so a collector in this environment refuses %ss; "
                        "pip install 'expman[media]'", kind)


def _np() -> Any:
    import numpy

    return numpy


def _descriptor(kind: str, key: str, step: Any, **extra: Any) -> dict[str, Any]:
    check_key(key)
    desc: dict[str, Any] = {"kind": kind, "key": key, "step": None if step is None else coerce_step(key, step)}
    desc.update({k: v for k, v in extra.items() if v is not None})
    return desc


def _transfer_name(desc: dict[str, Any]) -> str:
    return _name_for(desc["kind"], desc["key"])


@functools.lru_cache(maxsize=4096)
def _name_for(kind: str, key: str) -> str:
    """The transfer's artifact name (only logs show it; the key travels in the descriptor):
    media/<kind>/<key>, or a digest of the key where the key is no valid artifact name."""
    try:
        return normalize_name(f"media/{kind}/{key}")
    except ArtifactNameError:
        return f"media/{kind}/{hashlib.sha256(key.encode('utf-8', 'replace')).hexdigest()[:16]}"


def _queue(run: RunChannel, sender: Sender, payload: Any, desc: dict[str, Any], dtype: Any = None) -> None:
    """Queue bytes, or copy an array (as `dtype`, C order, little-endian) into a buffer of
    the pump's: the one copy the call makes."""
    name = _transfer_name(desc)
    if refuse_after_finish(run, f"{desc['kind']} {desc['key']!r}"):
        return
    pump = pump_for(sender)
    if not isinstance(payload, bytes):
        np = _np()
        dtype = np.dtype(dtype or payload.dtype).newbyteorder("<")
        buf = pump.buffer(payload.size * dtype.itemsize)
        np.copyto(np.frombuffer(buf, dtype=dtype).reshape(payload.shape), payload, casting="unsafe")
        payload = buf
    pump.submit_bytes(run, name, payload, desc)


def _queue_file(run: RunChannel, sender: Sender, path: str | os.PathLike[str], desc: dict[str, Any]) -> None:
    name = _transfer_name(desc)
    if refuse_after_finish(run, f"{desc['kind']} {desc['key']!r}"):
        return
    pump_for(sender).snapshot(run, path, name, media=desc)


def _tensor_to_numpy(value: Any) -> Any:
    """A torch (or similar) tensor as numpy, without importing torch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return value


def _caption(key: str, caption: Any) -> str | None:
    if caption is None:
        return None
    text = str(caption)
    if len(text) > MAX_CAPTION:
        raise ValueError(f"image {key!r}: caption longer than {MAX_CAPTION} characters")
    return text


def log_image(run: RunChannel, sender: Sender, key: str, image: Any, step: Any = None, caption: Any = None,
              layout: str | None = None) -> None:
    """Queue one image (see Experiment.log_image). `layout` overrides the guess from the
    type: torch tensors are CHW, numpy arrays HWC; N-prefixed layouts are tiled into a grid."""
    caption = _caption(key, caption)
    _check_pillow("image")
    if isinstance(image, (str, os.PathLike)):
        _queue_file(run, sender, image, _descriptor("image", key, step, caption=caption, encoding="file"))
        return
    if type(image).__module__.startswith("PIL."):
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.mode else "RGB")
        image = _np().asarray(image)
        layout = None
    elif layout is None and type(image).__module__.startswith("torch"):
        layout = "CHW" if image.ndim == 3 else ("NCHW" if image.ndim == 4 else None)
    array = _np().asarray(_tensor_to_numpy(image))
    if layout is None:
        layout = {2: "HW", 3: "HWC", 4: "NHWC"}.get(array.ndim)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
            layout = "CHW"  # a channels-first array (torch style) given as numpy
    if layout not in IMAGE_LAYOUTS or len(layout) != array.ndim:
        raise ValueError(f"image {key!r}: expected an array of shape HxW, HxWxC, CxHxW or NxHxWxC "
                         f"(layout {layout!r}), got shape {tuple(array.shape)}")
    dtype = _pixels("image", key, array, layout)
    _queue(run, sender, array, _descriptor(
        "image", key, step, caption=caption, encoding="raw", dtype=dtype, shape=list(array.shape), layout=layout),
        dtype)


def _pixels(kind: str, key: str, array: Any, layout: str) -> str:
    """The wire dtype of checked pixels: uint8 as they are, floats as float32 (the collector
    scales [0, 1] to 0..255), other integers 0..255 as uint8."""
    np = _np()
    channels = array.shape[layout.index("C")] if "C" in layout else 1
    if channels not in (1, 3, 4):
        raise ValueError(f"{kind} {key!r}: {channels} channels in layout {layout} (shape {tuple(array.shape)}); "
                         "expected 1, 3 or 4")
    if 0 in array.shape:
        raise ValueError(f"{kind} {key!r}: empty {kind} of shape {tuple(array.shape)}")
    if array.dtype == np.uint8:
        return "uint8"
    if array.dtype.kind == "f" or array.dtype == np.bool_:
        return "float32"
    if array.dtype.kind in "iu":
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"{kind} {key!r}: integer pixels must be 0..255 (or pass uint8, or floats in [0, 1])")
        return "uint8"
    raise TypeError(f"{kind} {key!r}: pixels of dtype {array.dtype} are not supported (uint8 or float in [0, 1])")


def log_video(run: RunChannel, sender: Sender, key: str, frames: Any, fps: Any = 4, step: Any = None,
              caption: Any = None, layout: str | None = None) -> None:
    """Frames (T, H, W[, C]) as numpy (or (T, C, H, W) as a torch tensor), stored as an
    animated PNG (lossless, every frame exact); or a video file (GIF, MP4, WebM, ...)
    stored as it is."""
    caption = _caption(key, caption)
    _check_pillow("video")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
        raise ValueError(f"video {key!r}: fps must be a number in (0, 1000], got {fps!r}")
    if isinstance(frames, (str, os.PathLike)):
        suffix = os.path.splitext(os.fspath(frames))[1].lower().lstrip(".")
        if suffix not in VIDEO_FILES:
            raise ValueError(f"video {key!r}: a video file must end in one of {', '.join(VIDEO_FILES)}")
        _queue_file(run, sender, frames, _descriptor("video", key, step, caption=caption, encoding="file",
                                                     format=suffix, fps=float(fps)))
        return
    if layout is None and type(frames).__module__.startswith("torch"):
        layout = {4: "TCHW", 5: "NTCHW"}.get(frames.ndim)
    array = _np().asarray(_tensor_to_numpy(frames))
    layout = layout or {3: "THW", 4: "THWC", 5: "NTHWC"}.get(array.ndim)
    if layout not in VIDEO_LAYOUTS or len(layout) != array.ndim:
        raise ValueError(f"video {key!r}: expected frames of shape TxHxW, TxHxWxC or TxCxHxW "
                         f"(layout {layout!r}), got shape {tuple(array.shape)}")
    dtype = _pixels("video", key, array, layout)
    _queue(run, sender, array, _descriptor(
        "video", key, step, caption=caption, encoding="raw", dtype=dtype, shape=list(array.shape), layout=layout,
        fps=float(fps)), dtype)


def log_figure(run: RunChannel, sender: Sender, name: str, figure: Any, step: Any = None,
               **savefig_kwargs: Any) -> None:
    """A matplotlib figure as a PNG image. Rendering runs here, on the caller's thread: a
    figure is not safe to draw from another thread while the caller may change it."""
    if not hasattr(figure, "savefig"):
        raise TypeError(f"figure {name!r}: expected a matplotlib Figure, got {type(figure).__name__}")
    buf = io.BytesIO()
    savefig_kwargs.setdefault("format", "png")
    if savefig_kwargs["format"] != "png":
        raise ValueError(f"figure {name!r}: figures are stored as PNG; format={savefig_kwargs['format']!r}")
    figure.savefig(buf, **savefig_kwargs)
    _queue(run, sender, buf.getvalue(), _descriptor("image", name, step, encoding="file"))


def log_histogram(run: RunChannel, sender: Sender, key: str, values: Any = None, step: Any = None, bins: Any = 64,
                  *, edges: Any = None, counts: Any = None) -> None:
    """Raw values (binned in the collector) or ready edges and counts (stored as given)."""
    np = _np()
    if values is not None and (edges is not None or counts is not None):
        raise ValueError(f"histogram {key!r}: pass values, or edges and counts, not both")
    if values is not None:
        array = np.asarray(_tensor_to_numpy(values))
        if array.dtype.kind not in "biuf":
            raise TypeError(f"histogram {key!r}: values of dtype {array.dtype} are not numbers")
        if isinstance(bins, str) or isinstance(bins, bool) or not isinstance(bins, (int, np.integer)):
            raise TypeError(f"histogram {key!r}: bins must be an int (or pass edges= and counts=)")
        if not 1 <= int(bins) <= 10_000:
            raise ValueError(f"histogram {key!r}: bins must be 1..10000, got {bins}")
        _queue(run, sender, array.reshape(-1), _descriptor("histogram", key, step, encoding="values", bins=int(bins)),
               np.float64)
        return
    if edges is None or counts is None:
        raise ValueError(f"histogram {key!r}: pass values, or both edges= and counts=")
    e = np.asarray(_tensor_to_numpy(edges), dtype=np.float64).ravel()
    c = np.asarray(_tensor_to_numpy(counts), dtype=np.float64).ravel()
    if len(e) != len(c) + 1 or len(c) == 0:
        raise ValueError(f"histogram {key!r}: edges must be one longer than counts (got {len(e)} and {len(c)})")
    if not (np.all(np.isfinite(e)) and np.all(np.diff(e) > 0)):
        raise ValueError(f"histogram {key!r}: edges must be finite and strictly increasing")
    _queue(run, sender, e.tobytes() + c.tobytes(), _descriptor("histogram", key, step, encoding="edges-counts"))


def log_table(run: RunChannel, sender: Sender, key: str, data: Any, step: Any = None) -> None:
    """An Arrow table, a pandas or polars frame, or a list of dicts, as Arrow IPC bytes
    (the collector writes Parquet). The conversion to Arrow runs here."""
    import pyarrow as pa

    module = type(data).__module__
    try:
        if isinstance(data, pa.Table):
            table = data
        elif isinstance(data, pa.RecordBatch):
            table = pa.Table.from_batches([data])
        elif module.startswith("pandas"):
            table = pa.Table.from_pandas(data, preserve_index=False)
        elif module.startswith("polars"):
            table = data.to_arrow()
        elif isinstance(data, list) and all(isinstance(row, dict) for row in data):
            table = pa.Table.from_pylist(data)
        elif isinstance(data, dict):
            table = pa.table(data)
        else:
            raise TypeError(f"table {key!r}: expected a pyarrow Table, a pandas or polars DataFrame, a dict "
                            f"of columns or a list of dicts, got {type(data).__name__}")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"table {key!r}: cannot be converted to Arrow: {exc}") from None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    _queue(run, sender, sink.getvalue().to_pybytes(), _descriptor("table", key, step, encoding="arrow-ipc"))


def log_audio(run: RunChannel, sender: Sender, key: str, samples: Any, sample_rate: Any, step: Any = None,
              caption: Any = None) -> None:
    """Samples of shape (n,) or (n, channels): int16 kept as 16-bit PCM, floats (in [-1, 1])
    as 32-bit float WAV. The WAV file is written by the collector."""
    np = _np()
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or not 0 < sample_rate <= 1_000_000:
        raise ValueError(f"audio {key!r}: sample_rate must be an int in 1..1000000, got {sample_rate!r}")
    array = np.asarray(_tensor_to_numpy(samples))
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or not 1 <= array.shape[1] <= 64 or array.shape[0] == 0:
        raise ValueError(f"audio {key!r}: expected samples of shape (n,) or (n, channels), got {tuple(np.shape(samples))}")
    if array.dtype == np.int16:
        dtype = "int16"
    elif array.dtype.kind == "f":
        dtype = "float32"
    else:
        raise TypeError(f"audio {key!r}: samples must be int16 or float, got {array.dtype}")
    _queue(run, sender, array, _descriptor(
        "audio", key, step, caption=_caption(key, caption), encoding="raw", dtype=dtype,
        shape=list(array.shape), sample_rate=int(sample_rate)), dtype)
