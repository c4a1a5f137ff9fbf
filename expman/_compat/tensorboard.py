"""TensorBoard event files: export a run's scalars, import scalars into a new run.

Uses the `tensorboard` package (its event-file writer and its own EventAccumulator
reader; no TensorFlow), installed with `pip install 'expman[tensorboard]'`.

Layout of an export: one folder per rank, `<out>/rank<N>/events.out.tfevents.*`, each
metric key a scalar tag. `tensorboard --logdir <out>` shows the ranks as runs. Import
reads every folder under the given one that holds event files: a folder named `rank<N>`
becomes rank N with its tags as keys; any other folder becomes rank 0 with its path as a
key prefix ("train/loss" for tag "loss" in `train/`), so several TensorBoard runs keep
apart in one expman run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from expman._errors import ExpmanError
from expman._storage.layout import KEY, RANK, STEP, TIME, VALUE

if TYPE_CHECKING:
    from expman._rank.experiment import Experiment
    from expman._reader.run import Run

_RANK_DIR = re.compile(r"^rank(\d+)$")
_EVENT_FILE = "tfevents"
_INSTALL_HINT = "TensorBoard event files need the tensorboard package: pip install 'expman[tensorboard]'"


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as exc:
        raise ExpmanError(_INSTALL_HINT) from exc


def export_tensorboard(run: Run, out_dir: str | os.PathLike[str], keys: Iterable[str] | None = None) -> dict[str, int]:
    """Write the run's numeric points as scalar events, one folder per rank.

    Points without a step get their index within their key and rank as the step (an
    event needs one). Text points are not exported. Returns counts: scalars, ranks, text
    points skipped.
    """
    _require_tensorboard()
    import pyarrow as pa
    import pyarrow.compute as pc
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    table = run.metrics(keys)
    numeric = table.filter(pc.is_valid(table[VALUE]))
    skipped = table.num_rows - numeric.num_rows
    seconds = pc.divide(numeric[TIME].cast(pa.int64()), 1e6).to_pylist()  # time is microseconds, UTC
    out = Path(out_dir)
    writers: dict[int, Any] = {}
    next_step: dict[tuple[int, str], int] = {}
    try:
        for key, value, step, rank, wall in zip(numeric[KEY].to_pylist(), numeric[VALUE].to_pylist(),
                                                numeric[STEP].to_pylist(), numeric[RANK].to_pylist(), seconds):
            writer = writers.get(rank)
            if writer is None:
                folder = out / f"rank{rank}"
                folder.mkdir(parents=True, exist_ok=True)
                writer = writers[rank] = EventFileWriter(str(folder), max_queue_size=1000)
            if step is None:
                step = next_step.get((rank, key), 0)
            next_step[(rank, key)] = step + 1
            summary = Summary(value=[Summary.Value(tag=key, simple_value=value)])
            writer.add_event(Event(wall_time=wall, step=step, summary=summary))
    finally:
        for writer in writers.values():
            writer.close()
    return {"scalars": numeric.num_rows, "ranks": len(writers), "text_skipped": skipped}


def read_scalars(logdir: str | os.PathLike[str]) -> dict[int, list[tuple[str, int, float, float]]]:
    """Every scalar under `logdir`, by rank: (key, step, value, wall time), in file order.

    Reads with TensorBoard's own EventAccumulator: classic `simple_value` scalars and the
    tensor-style scalars of TF2 / the `scalars` plugin.
    """
    _require_tensorboard()
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    base = Path(logdir)
    folders = sorted({p.parent for p in base.rglob(f"*{_EVENT_FILE}*") if p.is_file()})
    if not folders:
        raise ExpmanError(f"no TensorBoard event files under {base}")
    out: dict[int, list[tuple[str, int, float, float]]] = {}
    for folder in folders:
        relative = folder.relative_to(base)
        match = _RANK_DIR.match(folder.name)
        rank = int(match.group(1)) if match else 0
        parts = relative.parts[:-1] if match else relative.parts
        prefix = "".join(f"{part}/" for part in parts)
        acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
        acc.Reload()
        points = out.setdefault(rank, [])
        tags = acc.Tags()
        for tag in tags.get(ea.SCALARS, []):
            points += [(prefix + tag, e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]
        for tag in tags.get(ea.TENSORS, []):
            meta = acc.SummaryMetadata(tag)
            if meta.plugin_data.plugin_name != "scalars":
                continue
            for e in acc.Tensors(tag):
                value = tensor_util.make_ndarray(e.tensor_proto)
                if value.size == 1:
                    points.append((prefix + tag, e.step, float(value.reshape(())), e.wall_time))
    return out


def import_tensorboard(
    logdir: str | os.PathLike[str],
    experiment: str | None = None,
    name: str | None = None,
    root: str | os.PathLike[str] | None = None,
    **start_kwargs: Any,
) -> dict[str, Any]:
    """Read the scalars under `logdir` into a new run (one rank per `rank<N>` folder).

    The run is named after the folder unless `name` is given; it is finished before this
    returns. Returns the run's `run_dir`, `id`, and counts: `scalars`, `ranks`.
    """
    from expman._rank.start import _local_collector, start_experiment
    from expman._storage.files import resolve_root

    by_rank = read_scalars(logdir)
    if not any(by_rank.values()):
        raise ExpmanError(f"no scalars in the TensorBoard event files under {logdir}")
    world = max(by_rank) + 1  # a rank with no folder of its own is started empty, so the run can finish
    name = name or Path(logdir).resolve().name
    run_id = start_kwargs.pop("run_id", None) or os.urandom(6).hex()
    if "collector" not in start_kwargs:  # every rank through this process's private collector, not a job's shared one
        start_kwargs["collector"] = _local_collector(resolve_root(root), None).endpoint
    exps: list[Experiment] = []
    try:
        for rank in range(world):
            exp = start_experiment(experiment, name, root=root, rank=rank, world_size=world, run_id=run_id,
                                   **start_kwargs)
            exps.append(exp)
            if rank == 0:
                exp.log_parameters({"imported_from": str(Path(logdir).resolve())})
            for key, step, value, wall in by_rank.get(rank, []):
                exp.log_metric(key, value, step=step, timestamp=wall)
    except BaseException:
        for exp in exps:
            exp.finish("failed")
        raise
    for exp in exps:
        if not exp.finish("finished"):
            raise ExpmanError(f"the collector did not confirm the imported run {run_id} in time")
    return {"run_dir": exps[0].run_dir, "id": run_id, "scalars": sum(len(p) for p in by_rank.values()),
            "ranks": len(by_rank)}
