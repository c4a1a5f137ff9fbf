"""`expman.SummaryWriter`: the `torch.utils.tensorboard.SummaryWriter` methods people use,
writing into an expman run (no torch, no TensorBoard needed).

    from expman import SummaryWriter      # was: from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter("runs/mnist_1") as writer:    # experiment "runs", run "mnist_1"
        writer.add_scalar("loss", 0.5, global_step=1)

Methods for images, audio, video, graphs, embeddings, meshes, figures and PR curves raise
NotImplementedError naming the method. Histograms are stored as bucket counts: see
`HISTOGRAM_KEYS` and docs/integrations.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from expman._rank.experiment import Experiment

DEFAULT_BINS = 30
# add_histogram(tag, ...) at step s logs, all at step s:
HISTOGRAM_KEYS = {
    "{tag}/hist/min": "smallest value",
    "{tag}/hist/max": "largest value",
    "{tag}/hist/num": "how many values",
    "{tag}/hist/sum": "sum of the values",
    "{tag}/hist/sum_squares": "sum of their squares",
    "{tag}/hist/upper/{i:03d}": "upper edge of bucket i (i from 000, ascending edges)",
    "{tag}/hist/count/{i:03d}": "how many values fell in bucket i",
}

UNSUPPORTED = (
    "add_audio", "add_custom_scalars", "add_custom_scalars_marginchart", "add_custom_scalars_multilinechart",
    "add_embedding", "add_figure", "add_graph", "add_image", "add_image_with_boxes", "add_images", "add_mesh",
    "add_onnx_graph", "add_openvino_graph", "add_pr_curve", "add_pr_curve_raw", "add_video",
)


class SummaryWriter:
    """Writes scalars, text, hyperparameters and histograms into one expman run.

    `log_dir` names the run: its last part is the run name and the part before it the
    experiment ("runs/mnist_1" is run "mnist_1" of experiment "runs"); `comment` is
    appended to the name as TensorBoard does. With no `log_dir` the run gets expman's
    default name. `exp=` writes into a run you already started (close() then leaves it
    open). Other keywords go to `expman.start_experiment` (`root=`, `collector=`, ...);
    TensorBoard's `purge_step`, `max_queue`, `flush_secs` and `filename_suffix` are
    accepted and unused (expman sends every few milliseconds).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        comment: str = "",
        purge_step: int | None = None,
        max_queue: int = 10,
        flush_secs: int = 120,
        filename_suffix: str = "",
        *,
        exp: Experiment | None = None,
        **start_kwargs: Any,
    ) -> None:
        if purge_step is not None:
            raise NotImplementedError("SummaryWriter(purge_step=...): expman keeps every point; reopen the run instead")
        self._owned = exp is None
        if exp is None:
            from expman._rank.start import start_experiment

            space, name = _names(log_dir, comment)
            exp = start_experiment(start_kwargs.pop("space", space), name, **start_kwargs)
        self.exp = exp
        self._closed = False

    def get_logdir(self) -> str:
        return str(self.exp.run_dir)

    # --- what is supported ------------------------------------------------------------
    def add_scalar(self, tag: str, scalar_value: Any, global_step: int | None = None, walltime: float | None = None,
                   new_style: bool = False, double_precision: bool = False) -> None:
        self.exp.log_metric(tag, _number(tag, scalar_value), step=global_step, timestamp=walltime)

    def add_scalars(self, main_tag: str, tag_scalar_dict: dict[str, Any], global_step: int | None = None,
                    walltime: float | None = None) -> None:
        """Each value is stored under "main_tag/tag" (TensorBoard makes one run per tag instead)."""
        self.exp.log_metrics({f"{main_tag}/{k}": _number(f"{main_tag}/{k}", v) for k, v in tag_scalar_dict.items()},
                             step=global_step, timestamp=walltime)

    def add_text(self, tag: str, text_string: str, global_step: int | None = None, walltime: float | None = None) -> None:
        self.exp.log_metric(tag, str(text_string), step=global_step, timestamp=walltime)

    def add_hparams(self, hparam_dict: dict[str, Any], metric_dict: dict[str, Any],
                    hparam_domain_discrete: dict[str, list[Any]] | None = None, run_name: str | None = None,
                    global_step: int | None = None) -> None:
        """Hyperparameters become the run's parameters and the metrics points of this run
        (TensorBoard writes them into a separate sub-run named `run_name`)."""
        self.exp.log_parameters({k: _param(v) for k, v in hparam_dict.items()})
        self.exp.log_metrics({k: _number(k, v) for k, v in metric_dict.items()}, step=global_step)

    def add_histogram(self, tag: str, values: Any, global_step: int | None = None, bins: Any = "tensorflow",
                      walltime: float | None = None, max_bins: int | None = None) -> None:
        """Stored as bucket counts (keys in HISTOGRAM_KEYS). `bins` is a bucket count or a
        numpy bin rule ("auto", "fd", ...); TensorBoard's "tensorflow" means 30 equal buckets."""
        import numpy as np

        data = np.asarray(_to_numpy(values), dtype=np.float64).ravel()
        data = data[np.isfinite(data)]
        if bins == "tensorflow" or bins is None:
            bins = DEFAULT_BINS
        if data.size == 0:
            raise ValueError(f"add_histogram({tag!r}): no finite values")
        counts, edges = np.histogram(data, bins=bins)
        if max_bins is not None and len(counts) > max_bins:
            counts, edges = np.histogram(data, bins=max_bins)
        self._histogram(tag, float(data.min()), float(data.max()), int(data.size), float(data.sum()),
                        float(np.dot(data, data)), edges[1:].tolist(), counts.tolist(), global_step, walltime)

    def add_histogram_raw(self, tag: str, min: float, max: float, num: int, sum: float, sum_squares: float,  # noqa: A002
                          bucket_limits: Any, bucket_counts: Any, global_step: int | None = None,
                          walltime: float | None = None) -> None:
        limits, counts = list(_to_numpy(bucket_limits)), list(_to_numpy(bucket_counts))
        if len(limits) != len(counts):
            raise ValueError(f"add_histogram_raw({tag!r}): {len(limits)} bucket limits but {len(counts)} counts")
        self._histogram(tag, min, max, num, sum, sum_squares, limits, counts, global_step, walltime)

    def _histogram(self, tag: str, lo: float, hi: float, num: int, total: float, squares: float,
                   uppers: list[Any], counts: list[Any], step: int | None, walltime: float | None) -> None:
        points = {f"{tag}/hist/min": lo, f"{tag}/hist/max": hi, f"{tag}/hist/num": num,
                  f"{tag}/hist/sum": total, f"{tag}/hist/sum_squares": squares}
        for i, (upper, count) in enumerate(zip(uppers, counts)):
            points[f"{tag}/hist/upper/{i:03d}"] = float(upper)
            points[f"{tag}/hist/count/{i:03d}"] = float(count)
        self.exp.log_metrics(points, step=step, timestamp=walltime)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until the collector has persisted every point logged so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.exp.stats()
            if stats["buffered"] == 0 and stats["unacked_frames"] == 0:
                return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        """Finish the run (status finished), unless it was passed in with `exp=`."""
        if self._closed:
            return
        self._closed = True
        if self._owned:
            self.exp.finish("finished")
        else:
            self.flush()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._owned and not self._closed:
            self._closed = True
            self.exp.__exit__(exc_type, exc, tb)  # failed / killed on an exception
        else:
            self.close()

    def __repr__(self) -> str:
        return f"<expman.SummaryWriter {self.exp.experiment}/{self.exp.name} uid={self.exp.uid}>"


def _unsupported(name: str) -> Any:
    def method(self: SummaryWriter, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"SummaryWriter.{name} is not supported by expman (scalars, text, hparams and histograms are); "
            "log such files with exp.log_artifact(...) instead"
        )

    method.__name__ = name
    method.__doc__ = f"Not supported: raises NotImplementedError naming {name}."
    return method


for _name in UNSUPPORTED:
    setattr(SummaryWriter, _name, _unsupported(_name))


def _names(log_dir: str | os.PathLike[str] | None, comment: str) -> tuple[str | None, str | None]:
    if log_dir is None:
        return None, (time.strftime("run-%Y%m%d-%H%M%S") + comment) if comment else None
    parts = [p for p in Path(log_dir).parts if p not in ("/", ".", "..")]
    if not parts:
        return None, None
    name = parts[-1] + comment
    return (parts[-2] if len(parts) > 1 else None), name


def _to_numpy(values: Any) -> Any:
    if hasattr(values, "detach"):  # torch tensors
        values = values.detach().cpu().numpy()
    return values


def _number(key: str, value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 or hasattr(value, "numel") and value.numel() == 1:
        return value.item()  # numpy / torch scalars
    return value


def _param(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value
