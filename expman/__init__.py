"""expman: experiment tracking for distributed training.

    import expman
    with expman.start_experiment("mnist", "baseline") as exp:
        exp.log_parameters({"lr": 1e-3})
        exp.log_metric("loss", 0.5, step=1)
    run = expman.open_run(exp.run_dir)

Quick scripts can use the W&B-style verbs instead (`import expman as wandb`):
`expman.init`, `expman.log`, `expman.finish`, `expman.config`, `expman.run`.
"""

from ._api import start_experiment
from ._core import ExperimentConfig, LoggingEngine, MetricValue, RunStatus
from ._errors import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactKeyError,
    ArtifactNameError,
    ExpmanError,
    ProtocolError,
    RunNotFoundError,
)
from ._experiment import Experiment
from ._reader import Run, list_runs, open_run
from ._summary_writer import SummaryWriter
from ._values import Metric
from ._version import __version__
from ._wandb_style import config, finish, init, log, login

__all__ = [
    "ArtifactError",
    "ArtifactIntegrityError",
    "ArtifactKeyError",
    "ArtifactNameError",
    "Experiment",
    "ExperimentConfig",
    "ExpmanError",
    "LoggingEngine",
    "Metric",
    "MetricValue",
    "ProtocolError",
    "Run",
    "RunNotFoundError",
    "RunStatus",
    "SummaryWriter",
    "__version__",
    "config",
    "finish",
    "init",
    "list_runs",
    "log",
    "login",
    "open_run",
    "run",
    "start_experiment",
]

_DYNAMIC = ("run",)  # module attributes that change: computed on each access


def __getattr__(name: str):  # noqa: ANN202
    if name == "run":  # the current W&B-style run (expman.init), or None
        from ._wandb_style import current_run

        return current_run()
    raise AttributeError(f"module 'expman' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_DYNAMIC])
