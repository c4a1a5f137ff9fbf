"""The package as a user installs and imports it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import expman


def test_public_names_are_exactly_all():
    subpackages = {"collector", "tui", "notebook", "integrations"}  # attributes once something imports them
    public = {name for name in dir(expman) if not name.startswith("_")} - subpackages
    assert public == set(expman.__all__) - {"__version__"}
    assert expman.__all__ == sorted(expman.__all__)
    assert {"Audio", "Histogram", "Image", "Table", "Video"} <= set(expman.__all__)  # W&B-style media in expman.log


def test_import_expman_stays_light():
    code = "import sys, expman; print(sorted(m for m in ('pyarrow', 'textual', 'psutil', 'yaml_', 'expman.collector', 'torch', 'lightning', 'transformers', 'numpy', 'PIL', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_subpackages_install_under_expman():
    import expman.collector
    import expman.tui

    assert expman.collector.Collector
    result = subprocess.run([sys.executable, "-c", "import expman.tui, sys; sys.exit(expman.tui.main(['/nonexistent/root']))"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "is not a folder" in result.stderr


def test_expman_core_facade(root):
    config = expman.ExperimentConfig(name="core", base_dir=root, flush_interval_rows=100, flush_interval_ms=2)
    engine = expman.LoggingEngine(config)
    engine.log_params({"lr": 0.1, "layers": [8, 8]})
    for step in range(250):
        engine.log_vector({"loss": 1.0 / (step + 1), "acc": 0.5}, step=step)
    engine.log_vector([expman.MetricValue("extra", 2.0, step=3)])
    engine.log_scalar("lr", 0.1)
    engine.log_message("warning", "hot GPU")
    assert engine.close(expman.RunStatus.FAILED) is True
    run = expman.open_run(engine.run_dir)
    assert run.status == "failed"
    assert run.params == {"lr": 0.1, "layers": [8, 8]}
    assert run.metrics(keys=["loss"]).num_rows == 250
    assert run.metrics(keys="extra")["step"].to_pylist() == [3]
    assert "WARNING hot GPU" in run.log_text()
    with pytest.raises(ValueError):
        expman.ExperimentConfig(name="x", flush_interval_rows=0)


def test_facade_context_manager_records_failure(root):
    with pytest.raises(RuntimeError):
        with expman.LoggingEngine(expman.ExperimentConfig(name="core", base_dir=root)) as engine:
            engine.log_scalar("x", 1.0)
            raise RuntimeError("oops")
    assert expman.open_run(engine.run_dir).status == "failed"


def test_shutdown_is_public_and_finishes_open_runs(root):
    """expman.shutdown() finishes what is open and releases the threads; a later run starts afresh."""
    assert "shutdown" in expman.__all__ and expman.shutdown.__doc__
    exp = expman.start_experiment("e", "open", root=root)
    exp.log_metric("loss", 0.5, step=1)
    expman.shutdown()
    run = expman.open_run(exp.run_dir)
    assert run.status == "finished" and run.metrics().num_rows == 1
    with expman.start_experiment("e", "after", root=root) as again:
        again.log_metric("loss", 0.25, step=2)
    assert expman.open_run(again.run_dir).status == "finished"
