"""The expman-core style facade: ExperimentConfig / LoggingEngine over the same machinery.

Code written against expman-core keeps working; everything goes through
`start_experiment` and the Experiment, so there is one implementation to trust.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expman._rank.experiment import Experiment
from expman._rank.start import start_experiment
from expman._rank.values import Metric
from expman._storage.layout import STATUSES


# The run statuses of the storage schema, as expman-core's enum (one list: expman/_storage/layout.py).
RunStatus = enum.Enum("RunStatus", {status.upper(): status for status in STATUSES}, type=str)  # type: ignore[misc]

# expman-core's name for one point of `log_vector`: the same type as `expman.Metric`.
MetricValue = Metric


@dataclass
class ExperimentConfig:
    """`name` is the experiment; runs land in `base_dir/name/<run>/`.

    flush_interval_ms bounds how long a point waits in the rank before it is sent;
    flush_interval_rows caps the points per frame (the sender also sends on time).
    """

    name: str
    base_dir: str | os.PathLike[str] = "experiments"
    flush_interval_rows: int = 16384
    flush_interval_ms: int = 2
    run_name: str | None = None
    collector: str | None = None
    tags: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.flush_interval_rows, int) or self.flush_interval_rows < 1:
            raise ValueError(f"flush_interval_rows must be a positive int, got {self.flush_interval_rows!r}")
        if not isinstance(self.flush_interval_ms, (int, float)) or self.flush_interval_ms <= 0:
            raise ValueError(f"flush_interval_ms must be positive, got {self.flush_interval_ms!r}")


class LoggingEngine:
    """One run, expman-core style. Use as a context manager or call close()."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.experiment: Experiment = start_experiment(
            config.name,
            config.run_name,
            root=config.base_dir,
            collector=config.collector,
            tags=config.tags,
            flush_interval=config.flush_interval_ms / 1000.0,
            max_points_per_frame=config.flush_interval_rows,
        )

    @property
    def run_dir(self) -> Path:
        return self.experiment.run_dir

    @property
    def uid(self) -> str:
        return self.experiment.uid

    def log_params(self, params: dict[str, Any]) -> None:
        self.experiment.log_parameters(params)

    def log_scalar(self, key: str, value: Any, step: int | None = None) -> None:
        self.experiment.log_metric(key, value, step=step)

    def log_vector(self, values: dict[str, Any] | list[MetricValue], step: int | None = None) -> None:
        if isinstance(values, dict):
            self.experiment.log_metrics(values, step=step)
            return
        for mv in values:
            if not isinstance(mv, MetricValue):
                raise TypeError(f"log_vector takes a dict or a list of MetricValue, got {type(mv).__name__}")
            self.experiment.log_metric(mv.key, mv.value, step=mv.step if mv.step is not None else step, timestamp=mv.timestamp)

    def log_message(self, level: str, msg: str) -> None:
        self.experiment.log_message(msg, level=level)

    def close(self, status: RunStatus | str = RunStatus.FINISHED) -> bool:
        value = status.value if isinstance(status, RunStatus) else str(status)
        if value == RunStatus.RUNNING.value:
            raise ValueError("close() needs a final status, not RUNNING")
        return self.experiment.finish(value)

    def __enter__(self) -> LoggingEngine:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.experiment.__exit__(exc_type, exc, tb)
