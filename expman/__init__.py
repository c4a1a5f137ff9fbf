"""expman: experiment tracking for distributed training.

    import expman
    with expman.start_experiment("mnist", "baseline") as exp:
        exp.log_parameters({"lr": 1e-3})
        exp.log_metric("loss", 0.5, step=1)
    run = expman.open_run(exp.run_dir)
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
from ._values import Metric
from ._version import __version__

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
    "__version__",
    "list_runs",
    "open_run",
    "start_experiment",
]
