"""OPSML's experiment helpers: evaluation metrics and lookups by run id, over a real run."""

from __future__ import annotations

import expman


def test_eval_metrics_and_lookups_by_run_id(root, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPMAN_ROOT", str(root))
    with expman.start_experiment("opsml", "run") as exp:
        exp.log_parameters({"lr": 0.01, "batch": 32, "model": {"depth": 4}})
        for step in range(3):
            exp.log_metric("loss", 1.0 / (step + 1), step=step)
        exp.log_eval_metrics({"accuracy": 0.9, "f1": 0.8}, step=2)
        exp.log_artifact(_file(tmp_path / "weights.bin", b"w" * 100), "model/weights.bin")
    metrics = expman.get_experiment_metrics(exp.uid, ["loss", "accuracy"])
    assert [(m.key, m.value, m.step) for m in metrics] == [
        ("eval/accuracy", 0.9, 2), ("loss", 1.0, 0), ("loss", 0.5, 1), ("loss", 1 / 3, 2)]
    assert all(isinstance(m, expman.Metric) and m.timestamp > 0 for m in metrics)
    assert {m.key for m in expman.get_experiment_metrics(exp.uid)} == {"loss", "eval/accuracy", "eval/f1"}
    run = expman.open_run(exp.uid)
    assert run.metrics(keys=["eval/f1"])["value"].to_pylist() == [0.8]
    assert expman.get_experiment_parameters(exp.uid, ["lr", "missing"]) == {"lr": 0.01}
    assert expman.get_experiment_parameters(exp.uid)["model"] == {"depth": 4}
    out = tmp_path / "out"
    out.mkdir()
    landed = expman.download_artifact(exp.uid, "model/weights.bin", out)
    assert landed.read_bytes() == b"w" * 100 and landed.parent == out


def _file(path, data):
    path.write_bytes(data)
    return path
