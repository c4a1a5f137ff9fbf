"""expman: experiment tracking for distributed training.

    import expman
    with expman.start_experiment("mnist", "baseline") as exp:
        exp.log_parameters({"lr": 1e-3})
        exp.log_metric("loss", 0.5, step=1)
    run = expman.open_run(exp.run_dir)

Quick scripts can use the W&B-style verbs instead (`import expman as wandb`):
`expman.init`, `expman.log`, `expman.finish`, `expman.config`, `expman.run`.
"""

from expman._rank.start import shutdown, start_experiment
from expman._compat.expman_core import ExperimentConfig, LoggingEngine, MetricValue, RunStatus
from expman._compat.opsml import download_artifact, get_experiment_metrics, get_experiment_parameters
from expman._errors import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactKeyError,
    ArtifactNameError,
    ExpmanError,
    ProtocolError,
    RunNotFoundError,
)
from expman._rank.experiment import Experiment
from expman._reader.run import Run, list_runs, open_run
from expman._compat.summary_writer import SummaryWriter
from expman._rank.values import Metric
from expman._version import __version__
from expman._compat.wandb_style import Audio, Histogram, Image, Table, Video, config, finish, init, log, login

__all__ = [
    "ArtifactError",
    "ArtifactIntegrityError",
    "ArtifactKeyError",
    "ArtifactNameError",
    "Audio",
    "Experiment",
    "ExperimentConfig",
    "ExpmanError",
    "Histogram",
    "Image",
    "LoggingEngine",
    "Metric",
    "MetricValue",
    "ProtocolError",
    "Run",
    "RunNotFoundError",
    "RunStatus",
    "SummaryWriter",
    "Table",
    "Video",
    "__version__",
    "config",
    "download_artifact",
    "finish",
    "get_experiment_metrics",
    "get_experiment_parameters",
    "init",
    "list_runs",
    "log",
    "login",
    "open_run",
    "run",
    "shutdown",
    "start_experiment",
]

_DYNAMIC = ("run",)  # module attributes that change: computed on each access


def __getattr__(name: str):  # noqa: ANN202
    if name == "run":  # the current W&B-style run (expman.init), or None
        from expman._compat.wandb_style import current_run

        return current_run()
    raise AttributeError(f"module 'expman' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_DYNAMIC])
