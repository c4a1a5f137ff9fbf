"""docs/analysis.md: its DuckDB and Polars blocks run unchanged over a real experiment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import expman
from _helpers import wait_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "analysis.md"


def _blocks(title: str) -> str:
    section = DOC.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))


@pytest.fixture(scope="module")
def experiment_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Experiment "mnist": two runs of two ranks each, with different learning rates."""
    from expman._rank import start as _api

    root = tmp_path_factory.mktemp("analysis")
    endpoint = _api._local_collector(root, None).endpoint
    for lr, run_id in ((0.1, "lr01"), (0.01, "lr001")):
        exps = [expman.start_experiment("mnist", f"lr{lr}", root=root, rank=r, world_size=2, run_id=run_id,
                                        collector=endpoint) for r in (0, 1)]
        exps[0].log_parameters({"lr": lr})
        for step in range(10):
            for rank, exp in enumerate(exps):
                exp.log_metrics({"loss": (1 + rank) / (step + 1), "accuracy": lr * step + rank / 100}, step=step)
        for exp in exps:
            assert exp.finish()
    for run_id in ("lr01", "lr001"):
        wait_for(lambda: expman.open_run(run_id, root=root).status == "finished", 10, "the runs to finish")
    _api.shutdown()
    return root


def _run(code: str, root: Path) -> dict:
    code = code.replace('ROOT = "experiments"', f"ROOT = {str(root)!r}")
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    return scope


def test_duckdb_queries(experiment_root):
    pytest.importorskip("duckdb")
    scope = _run(_blocks("DuckDB"), experiment_root)
    assert scope["last_loss"] == [("lr0.01-lr001", 0, 9, 0.1), ("lr0.01-lr001", 1, 9, 0.2),
                                  ("lr0.1-lr01", 0, 9, 0.1), ("lr0.1-lr01", 1, 9, 0.2)]
    curves = scope["curves"]
    assert len(curves) == 20
    assert curves[0] == ("lr0.01-lr001", 0, 1.5, 2.0, 2)


def test_polars_queries(experiment_root):
    pytest.importorskip("polars")
    scope = _run(_blocks("Polars"), experiment_root)
    assert scope["best"].rows() == [("lr0.01-lr001", pytest.approx(0.1)), ("lr0.1-lr01", pytest.approx(0.91))]
    assert scope["by_lr"]["lr"].to_list() == [0.01, 0.1]


def test_reading_only_what_you_need(experiment_root, monkeypatch):
    pytest.importorskip("duckdb")
    monkeypatch.setenv("EXPMAN_ROOT", str(experiment_root))
    code = _blocks("Reading only what you need, and runs larger than memory").replace('"baseline"', '"lr01"')
    scope = _run(code, experiment_root)
    assert scope["loss"].column_names == ["value", "step", "rank"] and scope["loss"].num_rows == 0  # steps 0-9 only
    assert scope["mean"]["value"].to_pylist()[:2] == [1.5, 0.75] and scope["mean"].num_rows == 10
    assert scope["per_rank"] == [("accuracy", 0, 10, pytest.approx(0.45), 9), ("accuracy", 1, 10, pytest.approx(0.46), 9),
                                 ("loss", 0, 10, pytest.approx(sum(1 / (s + 1) for s in range(10)) / 10), 9),
                                 ("loss", 1, 10, pytest.approx(sum(2 / (s + 1) for s in range(10)) / 10), 9)]
    assert scope["total"] == 20
