"""TensorBoard event files: export a run's scalars, images, histograms and audio; import
TensorBoard runs (the same kinds) as expman runs.

Export writes the event files itself (expman/_compat/event_files.py: numpy, no
protobuf per point); import reads with the `tensorboard` package's own EventAccumulator
(no TensorFlow), installed with the `tensorboard` extra.

Layout of an export: one folder per rank, `<out>/rank<N>/events.out.tfevents.*`, each
metric key a scalar tag, each image (and animated-PNG or GIF video) key an image tag with
its stored bytes, each histogram key a histogram tag, each audio key an audio tag (WAV).
Tables and other videos have no TensorBoard kind: they are counted as skipped.
`tensorboard --logdir <out>` shows the ranks as runs.

Import: when the folder holds event files itself (or only `rank<N>` folders), it is one
run; otherwise each folder directly under it is a run, named after the folder. Within a
run, a folder named `rank<N>` is rank N; any other folder prefixes its tags ("train/loss"
for tag "loss" in `train/`), except the folders `add_hparams` writes, whose hyperparameters
become the run's parameters. Images (classic and TF2 tensor ones; pixels decoded with
Pillow), histograms (classic and TF2) and audio become the run's media; tags of other
kinds (text, PR curves, meshes, ...) are counted and reported as skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable

from expman._errors import ExpmanError
from expman._storage.layout import KEY, RANK, STEP, TIME, VALUE

if TYPE_CHECKING:
    from expman._rank.experiment import Experiment
    from expman._reader.run import Run

_RANK_DIR = re.compile(r"^rank(\d+)$")
_EVENT_FILE = "tfevents"
_INSTALL_HINT = ("TensorBoard event files need the tensorboard package: pip install tensorboard "
                 "(or the extra: pip install -e '.[tensorboard]' in the expman clone)")


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as exc:
        raise ExpmanError(_INSTALL_HINT) from exc


def export_tensorboard(run: Run, out_dir: str | os.PathLike[str], keys: Iterable[str] | None = None,
                       progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Write the run's numeric points as scalar events, one folder per rank.

    Points without a step are numbered on from the last step of their key and rank (an
    event needs one). Text points are not exported. `progress` is called with the number
    of points written as they are. Returns counts: scalars, ranks, text points skipped.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from expman._compat.event_files import ScalarEventFile

    table = run.metrics(keys)
    numeric = table.filter(pc.is_valid(table[VALUE]))
    skipped = table.num_rows - numeric.num_rows
    key_column = numeric[KEY].combine_chunks() if numeric.num_rows else pa.array([], pa.string())
    if not pa.types.is_dictionary(key_column.type):
        key_column = pc.dictionary_encode(key_column)
    tags = [str(k).encode() for k in key_column.dictionary.to_pylist()]
    key_index = key_column.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    values = numeric[VALUE].to_numpy().astype(np.float32)
    wall = numeric[TIME].cast(pa.int64()).to_numpy() / 1e6  # time is microseconds, UTC
    ranks = numeric[RANK].to_numpy()
    steps = numeric[STEP].fill_null(-1).to_numpy()
    stepless = ~numeric[STEP].is_valid().to_numpy(zero_copy_only=False)
    out = Path(out_dir)
    written = 0
    for rank in sorted(set(ranks.tolist())):
        rows = np.flatnonzero(ranks == rank)
        rank_steps = _fill_steps(key_index[rows], steps[rows], stepless[rows]) if stepless[rows].any() else steps[rows]
        with ScalarEventFile(out / f"rank{rank}", wall_time=float(wall[rows[0]])) as events:
            for start in range(0, rows.shape[0], _EXPORT_CHUNK):
                part = slice(start, start + _EXPORT_CHUNK)
                chunk = rows[part]
                events.write(tags, key_index[chunk], rank_steps[part], values[chunk], wall[chunk])
                written += chunk.shape[0]
                if progress is not None:
                    progress(chunk.shape[0])
    media = _export_media(run, out, keys)
    return {"scalars": written, "ranks": len(set(ranks.tolist()) | media.pop("rank_set")), "text_skipped": skipped,
            **media}


_EXPORTED_VIDEO = ("apng", "gif")  # videos TensorBoard shows as an image (the browser animates them)


def _export_media(run: Run, out: Path, keys: Iterable[str] | None) -> dict[str, Any]:
    """Each rank's images, histograms and audio as events in `<out>/rank<N>/` (a file of
    their own beside the scalars'). Returns counts, and the ranks written (`rank_set`)."""
    import numpy as np

    from expman._compat.event_files import ScalarEventFile, audio_value, histogram_value, image_value
    from expman._reader import media as _media

    counts: dict[str, Any] = {"images": 0, "histograms": 0, "audio": 0, "media_skipped": 0}
    wanted = list(keys) if keys is not None else None
    index = run.media(wanted).to_pylist() if (run.path / "media").is_dir() else []
    hists = run.histograms(wanted).to_pylist() if (run.path / "media").is_dir() else []
    by_rank: dict[int, list[tuple[int, float, bytes]]] = {}
    for row in index:
        kind, fmt = row["kind"], str(row["format"] or "")
        if not (kind == "image" or kind == "audio" or (kind == "video" and fmt in _EXPORTED_VIDEO)):
            counts["media_skipped"] += 1
            continue
        data = _media.read_bytes(run.path, run._files, row, None)
        if kind == "audio":
            value = audio_value(row["key"], data, float(row["sample_rate"]), int(row["channels"] or 1),
                                int(row["frames"] or 0))
            counts["audio"] += 1
        else:
            value = image_value(row["key"], data, int(row["height"] or 0), int(row["width"] or 0),
                                int(row["channels"] or 3))
            counts["images"] += 1
        by_rank.setdefault(row["rank"], []).append((row["step"] or 0, row["time"].timestamp(), value))
    for row in hists:
        value = histogram_value(row["key"], np.asarray(row["edges"]), np.asarray(row["counts"]), row["sum"])
        by_rank.setdefault(row["rank"], []).append((row["step"] or 0, row["time"].timestamp(), value))
        counts["histograms"] += 1
    for rank, events in sorted(by_rank.items()):
        with ScalarEventFile(out / f"rank{rank}", wall_time=events[0][1], suffix="expman-media") as file:
            for step, wall, value in events:
                file.write_values(step, wall, [value])
    counts["rank_set"] = set(by_rank)
    return counts


def _fill_steps(key_index: Any, steps: Any, stepless: Any) -> Any:
    """Steps for points logged without one: the previous step of the same key plus one
    per point since (from 0 for a key that starts without steps), in logging order."""
    import numpy as np

    order = np.argsort(key_index, kind="stable")
    keys, sorted_steps, missing = key_index[order], steps[order], stepless[order]
    position = np.arange(keys.shape[0])
    starts = np.concatenate(([True], keys[1:] != keys[:-1]))
    anchor = np.maximum.accumulate(np.where(~missing | starts, position, 0))
    filled = np.where(missing[anchor], position - anchor, sorted_steps[anchor] + (position - anchor))
    out = np.empty_like(steps)
    out[order] = filled
    return out


_EXPORT_CHUNK = 1 << 20


def read_scalars(logdir: str | os.PathLike[str], skipped: Counter[str] | None = None) -> dict[int, list[tuple[str, int, float, float]]]:
    """Every scalar under `logdir` (one run), by rank: (key, step, value, wall time), in file order.

    Reads with TensorBoard's own EventAccumulator: classic `simple_value` scalars and the
    tensor-style scalars of TF2 / the `scalars` plugin. Tags of kinds that are neither
    scalars nor media (images, histograms, audio) are counted in `skipped` ("text tags", ...).
    """
    return _read_run(Path(logdir), _event_folders(Path(logdir)), skipped if skipped is not None else Counter())[0]


def _event_folders(base: Path) -> list[Path]:
    folders = sorted({p.parent for p in base.rglob(f"*{_EVENT_FILE}*") if p.is_file()})
    if not folders:
        raise ExpmanError(f"no TensorBoard event files under {base}")
    return folders


def find_runs(logdir: str | os.PathLike[str]) -> dict[Path, list[Path]]:
    """The TensorBoard runs under `logdir`: each run's folder and the folders of event files in it."""
    base = Path(logdir)
    folders = _event_folders(base)
    if base in folders or all(_RANK_DIR.match(f.relative_to(base).parts[0]) for f in folders):
        return {base: folders}
    runs: dict[Path, list[Path]] = {}
    for folder in folders:
        runs.setdefault(base / folder.relative_to(base).parts[0], []).append(folder)
    return runs


Media = dict[int, list[tuple]]  # rank -> ("image", key, step, encoded) | ("histogram", key, step, edges, counts)
#                                        | ("audio", key, step, wav bytes)


def _read_run(base: Path, folders: list[Path], skipped: Counter[str]) -> tuple[dict[int, list[tuple[str, int, float, float]]], dict[str, Any], Media]:
    """The scalars (by rank), the add_hparams parameters and the media (by rank) of one
    run's event folders."""
    _require_tensorboard()
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    out: dict[int, list[tuple[str, int, float, float]]] = {}
    params: dict[str, Any] = {}
    media: Media = {}
    for folder in folders:
        relative = folder.relative_to(base)
        match = _RANK_DIR.match(folder.name)
        rank = int(match.group(1)) if match else 0
        acc = ea.EventAccumulator(str(folder), size_guidance={  # 0: keep every event (the default samples a few)
            ea.SCALARS: 0, ea.TENSORS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0, ea.AUDIO: 0, ea.COMPRESSED_HISTOGRAMS: 1})
        acc.Reload()
        hparams = _hparams(acc)
        params.update(hparams)
        parts = relative.parts[:-1] if (match or hparams) else relative.parts
        prefix = "".join(f"{part}/" for part in parts)
        points = out.setdefault(rank, [])
        tags = acc.Tags()
        for tag in tags.get(ea.SCALARS, []):
            points += [(prefix + tag, e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]
        for tag in tags.get(ea.TENSORS, []):
            plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
            if plugin == "hparams":
                continue
            if plugin in ("images", "histograms"):
                _tensor_media(acc, tag, prefix, plugin, media.setdefault(rank, []), tensor_util)
                continue
            if plugin != "scalars":
                skipped[f"{plugin or 'tensor'} tags"] += 1
                continue
            for e in acc.Tensors(tag):
                value = tensor_util.make_ndarray(e.tensor_proto)
                if value.size == 1:
                    points.append((prefix + tag, e.step, float(value.reshape(())), e.wall_time))
                else:
                    skipped["non-scalar tensor points"] += 1
        _classic_media(acc, tags, prefix, media.setdefault(rank, []))
    return out, params, media


def _classic_media(acc: Any, tags: dict[str, Any], prefix: str, into: list[tuple]) -> None:
    """Images, histograms and audio written as `Summary.Value` fields (PyTorch's
    SummaryWriter, TF1, expman's export)."""
    for tag in tags.get("images", []):
        into += [("image", prefix + tag, e.step, e.encoded_image_string) for e in acc.Images(tag)]
    for tag in tags.get("histograms", []):
        for e in acc.Histograms(tag):
            h = e.histogram_value
            into.append(("histogram", prefix + tag, e.step,
                         *_edges(h.min, h.max, list(h.bucket_limit), list(h.bucket))))
    for tag in tags.get("audio", []):
        into += [("audio", prefix + tag, e.step, e.encoded_audio_string) for e in acc.Audio(tag)]


def _tensor_media(acc: Any, tag: str, prefix: str, plugin: str, into: list[tuple], tensor_util: Any) -> None:
    """TF2-style images (a string tensor: width, height, then encoded images; the n-th
    image of a step becomes `tag/n` when there are several) and histograms (a k x 3 tensor
    of left edge, right edge, count)."""
    for e in acc.Tensors(tag):
        value = tensor_util.make_ndarray(e.tensor_proto)
        if plugin == "images":
            images = list(value.reshape(-1)[2:])
            for i, encoded in enumerate(images):
                into.append(("image", prefix + tag + (f"/{i}" if len(images) > 1 else ""), e.step, bytes(encoded)))
        elif value.ndim == 2 and value.shape[1] == 3 and value.shape[0] > 0:
            into.append(("histogram", prefix + tag, e.step, [float(value[0, 0]), *map(float, value[:, 1])],
                         [float(c) for c in value[:, 2]]))


def _edges(low: float, high: float, limits: list[float], counts: list[float]) -> tuple[list[float], list[float]]:
    """A TensorBoard histogram (upper bucket limits, the first bucket from `min`) as edges
    and counts: a last limit past `max` (DBL_MAX) becomes `max`, as SummaryWriter.add_histogram_raw reads it."""
    if len(limits) > 1 and limits[-1] > high > limits[-2]:
        limits[-1] = high
    width = limits[1] - limits[0] if len(limits) > 1 else 1.0
    lower = low if low < limits[0] else limits[0] - width
    return [lower, *limits], counts


def _hparams(acc: Any) -> dict[str, Any]:
    """The hyperparameters `add_hparams` (PyTorch, TensorBoard's hparams API) left in a folder."""
    try:
        contents = acc.PluginTagToContent("hparams")
    except KeyError:
        return {}
    from tensorboard.plugins.hparams import plugin_data_pb2

    params: dict[str, Any] = {}
    for content in contents.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.WhichOneof("data") != "session_start_info":
            continue
        for name, value in data.session_start_info.hparams.items():
            kind = value.WhichOneof("kind")
            params[name] = None if kind in (None, "null_value") else getattr(value, kind)
    return params


def import_tensorboard(
    logdir: str | os.PathLike[str],
    experiment: str | None = None,
    name: str | None = None,
    root: str | os.PathLike[str] | None = None,
    progress: Callable[[int], None] | None = None,
    **start_kwargs: Any,
) -> dict[str, Any]:
    """Read the TensorBoard runs under `logdir` into new expman runs (see the module doc).

    Each run is named after its folder (`name` names it when there is just one) and is
    finished before this returns. Returns `runs` (each with `run_dir`, `id`, counts
    `scalars`, `ranks`, `params`), what was `skipped` (a count per kind), and the first
    run's `run_dir`, `id`, `scalars` and `ranks`.
    """
    from expman._rank.start import _local_collector
    from expman._storage.files import resolve_root

    runs = find_runs(logdir)
    if name is not None and len(runs) > 1:
        listed = ", ".join(sorted(p.name for p in runs))
        raise ExpmanError(f"{logdir} holds {len(runs)} TensorBoard runs ({listed}): --name names one run, leave it out")
    if "collector" not in start_kwargs:  # every rank through this process's private collector, not a job's shared one
        start_kwargs["collector"] = _local_collector(resolve_root(root), None).endpoint
    skipped: Counter[str] = Counter()
    results = []
    for run_dir, folders in runs.items():
        by_rank, params, media = _read_run(run_dir, folders, skipped)
        if not any(by_rank.values()) and not any(media.values()):
            skipped["runs without scalars or media"] += 1
            continue
        results.append(_log_run(run_dir, by_rank, params, media, skipped, experiment, name or run_dir.resolve().name,
                                root, progress, dict(start_kwargs)))
    if not results:
        raise ExpmanError(f"no scalars, images, histograms or audio in the TensorBoard event files under {logdir}")
    return {**{k: results[0][k] for k in ("run_dir", "id", "scalars", "ranks")}, "runs": results,
            "skipped": dict(skipped)}


def _log_run(folder: Path, by_rank: dict[int, list[tuple[str, int, float, float]]], params: dict[str, Any],
             media: Media, skipped: Counter[str], experiment: str | None, name: str,
             root: str | os.PathLike[str] | None, progress: Callable[[int], None] | None,
             start_kwargs: dict[str, Any]) -> dict[str, Any]:
    from expman._rank.start import start_experiment

    world = max([*by_rank, *(r for r, items in media.items() if items)]) + 1  # a rank with no folder of its own is started empty
    logged: Counter[str] = Counter()
    run_id = start_kwargs.pop("run_id", None) or os.urandom(6).hex()
    exps: list[Experiment] = []
    try:
        for rank in range(world):
            exp = start_experiment(experiment, name, root=root, rank=rank, world_size=world, run_id=run_id,
                                   **start_kwargs)
            exps.append(exp)
            if rank == 0:
                exp.log_parameters({**params, "imported_from": str(folder.resolve())})
            points = by_rank.get(rank, [])
            for key, step, value, wall in points:
                exp.log_metric(key, value, step=step, timestamp=wall)
            for item in media.get(rank, []):
                _log_media(exp, item, logged, skipped)
            if progress is not None:
                progress(len(points) + len(media.get(rank, [])))
    except BaseException:
        for exp in exps:
            exp.finish("failed")
        raise
    for exp in exps:
        if not exp.finish("finished"):
            raise ExpmanError(f"the collector did not confirm the imported run {run_id} in time")
    return {"run_dir": exps[0].run_dir, "id": run_id, "scalars": sum(len(p) for p in by_rank.values()),
            "ranks": len({*by_rank, *(r for r, items in media.items() if items)}), "params": len(params),
            "folder": folder, "images": logged["image"], "histograms": logged["histogram"], "audio": logged["audio"]}


def _log_media(exp: Experiment, item: tuple, logged: Counter[str], skipped: Counter[str]) -> None:
    """One image, histogram or clip into the run; one that expman cannot take is counted
    in `skipped` with the reason's kind, never fatal to the import."""
    import io

    kind, key, step = item[:3]
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(io.BytesIO(item[3])) as img:
                if img.mode not in ("L", "RGB", "RGBA"):
                    img = img.convert("RGBA" if "transparency" in img.info or "A" in img.mode else "RGB")
                import numpy as np

                exp.log_image(key, np.asarray(img), step=step)
        elif kind == "histogram":
            exp.log_histogram(key, step=step, edges=item[3], counts=item[4])
        else:
            from expman._storage import wav

            samples, rate = wav.decode(item[3])
            exp.log_audio(key, samples, rate, step=step)
    except ImportError:
        skipped[f"{kind}s (Pillow is not installed: pip install pillow)"] += 1
        return
    except (ValueError, TypeError, OSError, ExpmanError) as exc:
        skipped[f"{kind}s expman could not read ({type(exc).__name__})"] += 1
        return
    logged[kind] += 1
