"""TensorBoard event files: export a run's scalars, import TensorBoard runs as expman runs.

Export writes the event files itself (expman/_compat/event_files.py: numpy, no
protobuf per point); import reads with the `tensorboard` package's own EventAccumulator
(no TensorFlow), installed with the `tensorboard` extra.

Layout of an export: one folder per rank, `<out>/rank<N>/events.out.tfevents.*`, each
metric key a scalar tag. `tensorboard --logdir <out>` shows the ranks as runs.

Import: when the folder holds event files itself (or only `rank<N>` folders), it is one
run; otherwise each folder directly under it is a run, named after the folder. Within a
run, a folder named `rank<N>` is rank N; any other folder prefixes its tags ("train/loss"
for tag "loss" in `train/`), except the folders `add_hparams` writes, whose hyperparameters
become the run's parameters. Tags that are not scalars (histograms, images, text, ...) are
counted and reported as skipped.
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
    return {"scalars": written, "ranks": len(set(ranks.tolist())), "text_skipped": skipped}


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
    tensor-style scalars of TF2 / the `scalars` plugin. Tags of any other kind are counted
    in `skipped` ("histogram tags", "text tags", ...).
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


def _read_run(base: Path, folders: list[Path], skipped: Counter[str]) -> tuple[dict[int, list[tuple[str, int, float, float]]], dict[str, Any]]:
    """The scalars (by rank) and the add_hparams parameters of one run's event folders."""
    _require_tensorboard()
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    out: dict[int, list[tuple[str, int, float, float]]] = {}
    params: dict[str, Any] = {}
    for folder in folders:
        relative = folder.relative_to(base)
        match = _RANK_DIR.match(folder.name)
        rank = int(match.group(1)) if match else 0
        acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
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
            if plugin != "scalars":
                skipped[f"{plugin or 'tensor'} tags"] += 1
                continue
            for e in acc.Tensors(tag):
                value = tensor_util.make_ndarray(e.tensor_proto)
                if value.size == 1:
                    points.append((prefix + tag, e.step, float(value.reshape(())), e.wall_time))
                else:
                    skipped["non-scalar tensor points"] += 1
        for kind, noun in _OTHER_KINDS.items():
            if tags.get(kind):
                skipped[noun] += len(tags[kind])
    return out, params


_OTHER_KINDS = {"images": "image tags", "audio": "audio tags", "histograms": "histogram tags"}


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
        by_rank, params = _read_run(run_dir, folders, skipped)
        if not any(by_rank.values()):
            skipped["runs without scalars"] += 1
            continue
        results.append(_log_run(run_dir, by_rank, params, experiment, name or run_dir.resolve().name, root,
                                progress, dict(start_kwargs)))
    if not results:
        raise ExpmanError(f"no scalars in the TensorBoard event files under {logdir}")
    return {**{k: results[0][k] for k in ("run_dir", "id", "scalars", "ranks")}, "runs": results,
            "skipped": dict(skipped)}


def _log_run(folder: Path, by_rank: dict[int, list[tuple[str, int, float, float]]], params: dict[str, Any],
             experiment: str | None, name: str, root: str | os.PathLike[str] | None,
             progress: Callable[[int], None] | None, start_kwargs: dict[str, Any]) -> dict[str, Any]:
    from expman._rank.start import start_experiment

    world = max(by_rank) + 1  # a rank with no folder of its own is started empty, so the run can finish
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
            if progress is not None:
                progress(len(points))
    except BaseException:
        for exp in exps:
            exp.finish("failed")
        raise
    for exp in exps:
        if not exp.finish("finished"):
            raise ExpmanError(f"the collector did not confirm the imported run {run_id} in time")
    return {"run_dir": exps[0].run_dir, "id": run_id, "scalars": sum(len(p) for p in by_rank.values()),
            "ranks": len(by_rank), "params": len(params), "folder": folder}
