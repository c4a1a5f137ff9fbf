"""PyTorch Lightning: `ExpmanLogger`, a Lightning `Logger` that writes into an expman run.

    from expman.integrations.lightning import ExpmanLogger
    trainer = lightning.Trainer(logger=ExpmanLogger("mnist", "baseline"), ...)

Unlike Lightning's own loggers, nothing here is rank-zero-only: under DDP every rank logs
its own series into the same run (expman keeps them apart by rank and merges at read
time). The ranks agree on the run id as expman/integrations/_run_ids.py says. The run
starts on first use, which inside `trainer.fit` is after the process group is up, so
rank and world size come from torch.distributed.
"""

from __future__ import annotations

import sys
from argparse import Namespace
from typing import Any, Mapping

try:
    from lightning.pytorch.loggers import Logger
except ImportError as exc:
    raise ImportError(
        "expman.integrations.lightning needs PyTorch Lightning (the `lightning` package): "
        "pip install 'expman[lightning]'"
    ) from exc

from expman import Experiment, start_experiment
from expman._rank.experiment import describe_exception  # the shape run.yaml's `error` takes
from expman._rank.start import DEFAULT_EXPERIMENT
from ._params import to_params
from ._run_ids import adapter_run_id

# Lightning's finalize() status -> the run's status. "finished" comes from the Slurm
# requeue handler: the job is being stopped to run again later, as a new run.
STATUSES = {"success": "finished", "failed": "failed", "finished": "killed"}


class ExpmanLogger(Logger):
    """Logs hyperparameters and metrics of every rank into one expman run.

    `space` is the experiment (Lightning's `name`) and `name` the run's name; the run id
    is Lightning's `version`. Other keywords go to `expman.start_experiment` (`root=`,
    `collector=`, `tags=`, `log_hardware=`, `run_id=`, ...). `save_dir` is where
    Lightning puts checkpoints (`save_dir/<space>/<run id>/checkpoints`); None, the
    default, lets Lightning use the Trainer's `default_root_dir`. Run directories belong
    to the collector, so checkpoints never go there: store one with
    `logger.experiment.log_artifact(path)`.
    """

    def __init__(
        self,
        space: str | None = None,
        name: str | None = None,
        *,
        save_dir: str | None = None,
        **start_kwargs: Any,
    ) -> None:
        super().__init__()
        self._space = space
        self._run_name = name
        self._save_dir = save_dir
        self._run_id = adapter_run_id(start_kwargs.pop("run_id", None))
        self._start_kwargs = start_kwargs
        self._exp: Experiment | None = None

    # --- what Lightning asks for -----------------------------------------------------------
    @property
    def name(self) -> str:
        return self._space if self._space is not None else DEFAULT_EXPERIMENT

    @property
    def version(self) -> str:
        return self._run_id

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    @property
    def experiment(self) -> Experiment:
        """This rank's `expman.Experiment` (on every rank, not only rank 0). Starts the run
        on first use, and reopens it if it was finalized (fit, then test)."""
        exp = self._exp
        if exp is None or exp.status != "running":
            exp = self._exp = self._start(reopen=exp is not None)
        return exp

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Merge hyperparameters into the run's config.yaml, nesting kept (see _params.py);
        a `metrics` dict (TensorBoard's hparams metrics) is logged as points."""
        self.experiment.log_parameters(to_params(params))
        metrics = kwargs.get("metrics")
        if isinstance(metrics, Mapping) and metrics:
            self.experiment.log_metrics(dict(metrics), step=kwargs.get("step"))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.experiment.log_metrics(dict(metrics), step=step)

    def log_image(self, key: str, images: Any, step: int | None = None, **kwargs: Any) -> None:
        """Images as Lightning's W&B and Neptune loggers take them: a list of images (numpy,
        PIL, CHW tensors, file paths; see `Experiment.log_image`), or one image, with an
        optional `caption=` list of the same length. One image is stored under `key`;
        several under `key/0`, `key/1`, ... (one image per key and step and rank)."""
        unknown = sorted(set(kwargs) - {"caption"})
        if unknown:
            raise TypeError(f"log_image: expman takes only caption= besides the images, not {', '.join(unknown)}")
        many = isinstance(images, (list, tuple))
        items = list(images) if many else [images]
        captions = kwargs.get("caption")
        if captions is None:
            captions = [None] * len(items)
        elif isinstance(captions, str):
            captions = [captions]
        if len(captions) != len(items):
            raise ValueError(f"log_image: {len(captions)} captions for {len(items)} images under {key!r}")
        for i, (image, caption) in enumerate(zip(items, captions)):
            name = f"{key}/{i}" if len(items) > 1 else key
            self.experiment.log_image(name, image, step=step, caption=None if caption is None else str(caption))

    def finalize(self, status: str) -> None:
        """Finish this rank's part of the run: success -> finished, failed -> failed
        (killed for a KeyboardInterrupt, with the exception in run.yaml), finished -> killed."""
        exp = self._exp
        if exp is None or exp.status != "running":
            return
        ours = STATUSES.get(status, "failed")
        error = None
        if ours == "failed":
            handling = sys.exc_info()[1]  # Lightning calls us from inside its `except` block
            if handling is not None:
                ours = "killed" if isinstance(handling, KeyboardInterrupt) else "failed"
                error = describe_exception(handling)
        exp.finish(ours, error=error)

    # --- plumbing ------------------------------------------------------------------------------
    def _start(self, reopen: bool) -> Experiment:
        kwargs = dict(self._start_kwargs)
        rank, world_size = _rank_and_world_size()
        kwargs.setdefault("rank", rank)
        kwargs.setdefault("world_size", world_size)
        if reopen:
            kwargs.update(experiment_uid=self._run_id, code_dir=False)
        return start_experiment(self._space, self._run_name, run_id=self._run_id, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        """ddp_spawn pickles the logger into each rank: the run itself stays behind."""
        state = self.__dict__.copy()
        state["_exp"] = None
        return state


def _rank_and_world_size() -> tuple[int | None, int | None]:
    """From torch.distributed once the process group is up; else None (expman reads the launcher's env)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None, None
