"""OPSML's experiment helpers over expman: evaluation metrics and lookups by run id.

OPSML code calls `exp.log_eval_metrics({...})` and the module-level
`get_experiment_metrics(uid, names)`, `get_experiment_parameters(uid, names)` and
`download_artifact(uid, path, lpath)`; these do the same through the reader. Evaluation
metrics are ordinary points whose key carries the `eval/` prefix (EVAL_PREFIX), so every
reader, DuckDB included, can pick them out (`key LIKE 'eval/%'`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from expman._rank.values import Metric, eval_key
from expman._reader.run import open_run


def get_experiment_metrics(experiment_uid: str, names: Iterable[str] | None = None) -> list[Metric]:
    """Every point of the run (or of the keys in `names`), as expman.Metric, in step order
    per key; an evaluation metric is found by its name with or without `eval/`."""
    run = open_run(experiment_uid)
    keys = None
    if names is not None:
        keys = [k for name in names for k in (name, eval_key(name))]
    table = run.metrics(keys=keys)
    rows = table.select(["key", "value", "text", "step", "time"]).to_pylist()
    rows.sort(key=lambda r: (r["key"], r["step"] if r["step"] is not None else -1))
    return [Metric(r["key"], r["text"] if r["value"] is None else r["value"], r["step"], r["time"].timestamp())
            for r in rows]


def get_experiment_parameters(experiment_uid: str, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The run's parameters (config.yaml), or only those named (a missing name is left out)."""
    params = open_run(experiment_uid).params
    if names is None:
        return params
    return {name: params[name] for name in names if name in params}


def download_artifact(experiment_uid: str, path: str, lpath: str | os.PathLike[str] | None = None) -> Path:
    """Copy the run's artifact `path` to `lpath` (a folder or a file name; default the
    current folder) and return where it landed."""
    return Path(open_run(experiment_uid).download_artifact(path, lpath if lpath is not None else "."))
