"""`expman.SummaryWriter`: the `torch.utils.tensorboard.SummaryWriter` methods people use,
writing into an expman run (no torch, no TensorBoard needed).

    from expman import SummaryWriter      # was: from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter("runs/mnist_1") as writer:    # experiment "runs", run "mnist_1"
        writer.add_scalar("loss", 0.5, global_step=1)

Images, figures, histograms and audio go to the run's media (expman/_rank/media.py:
copied at the call, encoded by the collector). Video, graphs, embeddings, meshes and PR
curves raise NotImplementedError naming the method; see docs/integrations.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from expman._rank.experiment import Experiment

DEFAULT_BINS = 30

UNSUPPORTED = (
    "add_custom_scalars", "add_custom_scalars_marginchart", "add_custom_scalars_multilinechart",
    "add_embedding", "add_graph", "add_image_with_boxes", "add_mesh",
    "add_onnx_graph", "add_openvino_graph", "add_pr_curve", "add_pr_curve_raw",
)


class SummaryWriter:
    """Writes scalars, text, hyperparameters, histograms, images, figures and audio into
    one expman run.

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
        """A histogram in the run's media (`run.histograms()`). `bins` is a bucket count or a
        numpy bin rule ("auto", "fd", ...); TensorBoard's "tensorflow" means 30 equal buckets.
        With a count the collector bins the values; a rule is applied here."""
        import numpy as np

        if bins == "tensorflow" or bins is None:
            bins = DEFAULT_BINS
        if max_bins is not None and isinstance(bins, int):
            bins = min(bins, max_bins)
        if isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
            self.exp.log_histogram(tag, _to_numpy(values), step=global_step, bins=int(bins))
            return
        data = np.asarray(_to_numpy(values), dtype=np.float64).ravel()
        data = data[np.isfinite(data)]
        if data.size == 0:
            raise ValueError(f"add_histogram({tag!r}): no finite values")
        counts, edges = np.histogram(data, bins=bins)
        if max_bins is not None and len(counts) > max_bins:
            counts, edges = np.histogram(data, bins=max_bins)
        self.exp.log_histogram(tag, step=global_step, edges=edges, counts=counts)

    def add_histogram_raw(self, tag: str, min: float, max: float, num: int, sum: float, sum_squares: float,  # noqa: A002
                          bucket_limits: Any, bucket_counts: Any, global_step: int | None = None,
                          walltime: float | None = None) -> None:
        """Your buckets: `bucket_limits` are upper edges; the first bucket starts at `min`
        (or one bucket width below its limit), and a last limit past `max` (TensorBoard
        writes DBL_MAX) is taken as `max`."""
        limits = [float(v) for v in _to_numpy(bucket_limits)]
        counts = [float(v) for v in _to_numpy(bucket_counts)]
        if len(limits) != len(counts) or not limits:
            raise ValueError(f"add_histogram_raw({tag!r}): {len(limits)} bucket limits but {len(counts)} counts")
        if len(limits) > 1 and limits[-1] > float(max) > limits[-2]:
            limits[-1] = float(max)
        width = limits[1] - limits[0] if len(limits) > 1 else 1.0
        lower = float(min) if float(min) < limits[0] else limits[0] - width
        self.exp.log_histogram(tag, step=global_step, edges=[lower, *limits], counts=counts)

    # --- images, figures, audio (the run's media) ---------------------------------------
    def add_image(self, tag: str, img_tensor: Any, global_step: int | None = None, walltime: float | None = None,
                  dataformats: str = "CHW") -> None:
        """uint8, or floats in [0, 1]; `dataformats` "CHW" (TensorBoard's default), "HWC" or "HW"."""
        from expman._rank import media

        media.log_image(self.exp._channel, self.exp._sender, tag, _to_numpy(img_tensor), global_step,
                        layout=_layout(tag, dataformats, ("CHW", "HWC", "HW")))

    def add_images(self, tag: str, img_tensor: Any, global_step: int | None = None, walltime: float | None = None,
                   dataformats: str = "NCHW") -> None:
        """A batch of images stored as one image, tiled in a grid as TensorBoard shows it."""
        from expman._rank import media

        media.log_image(self.exp._channel, self.exp._sender, tag, _to_numpy(img_tensor), global_step,
                        layout=_layout(tag, dataformats, ("NCHW", "NHWC")))

    def add_figure(self, tag: str, figure: Any, global_step: int | None = None, close: bool = True,
                   walltime: float | None = None) -> None:
        """A matplotlib figure (or a list: stored as `tag/0`, `tag/1`, ...) as PNG."""
        figures = figure if isinstance(figure, (list, tuple)) else [figure]
        for i, fig in enumerate(figures):
            self.exp.log_figure(tag if len(figures) == 1 and fig is figure else f"{tag}/{i}", fig, global_step)
            if close:
                import matplotlib.pyplot as plt

                plt.close(fig)

    def add_video(self, tag: str, vid_tensor: Any, global_step: int | None = None, fps: float = 4,
                  walltime: float | None = None) -> None:
        """Videos (N, T, C, H, W) as TensorBoard takes them: one animated PNG, the N videos
        tiled in a grid frame by frame (TensorBoard writes a GIF)."""
        from expman._rank import media

        media.log_video(self.exp._channel, self.exp._sender, tag, _to_numpy(vid_tensor), fps, global_step,
                        layout="NTCHW")

    def add_audio(self, tag: str, snd_tensor: Any, global_step: int | None = None, sample_rate: int = 44100,
                  walltime: float | None = None) -> None:
        """Samples in [-1, 1], shape (L,) or (1, L) as TensorBoard takes them, or (L, channels)."""
        import numpy as np

        samples = np.asarray(_to_numpy(snd_tensor))
        if samples.ndim == 2 and samples.shape[0] == 1:
            samples = samples[0]
        self.exp.log_audio(tag, samples, int(sample_rate), step=global_step)

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
            f"SummaryWriter.{name} is not supported by expman (scalars, text, hparams, histograms, images, "
            "figures and audio are); "
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


def _layout(tag: str, dataformats: str, allowed: tuple[str, ...]) -> str:
    layout = str(dataformats).upper()
    if layout not in allowed:
        raise ValueError(f"{tag!r}: dataformats must be one of {allowed}, got {dataformats!r}")
    return layout


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
