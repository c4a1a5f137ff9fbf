"""exp.run_dir is where the collector that writes the run keeps it, whenever it is read."""

from __future__ import annotations

import pytest
from conftest import start_collector

import expman
from expman._rank import experiment


def test_run_dir_inside_the_block_is_the_collectors_folder_not_a_guess(tmp_path, short_dir, monkeypatch):
    service_root = tmp_path / "srv" / "root"  # the service collector's --root
    c = start_collector(service_root, short_dir)
    try:
        monkeypatch.chdir(tmp_path)  # the rank's own default root would be ./experiments
        monkeypatch.delenv("EXPMAN_ROOT", raising=False)
        monkeypatch.setenv("EXPMAN_COLLECTOR", c.endpoint)
        with expman.start_experiment("default", "x") as exp:
            exp.log_metric("loss", 1.0, step=0)
            inside = exp.run_dir
            assert inside.parent.parent == service_root.resolve()
            assert inside.is_dir(), "the folder a training script writes its checkpoints next to exists"
            (inside / "ckpt.pt").write_bytes(b"weights")
        assert exp.run_dir == inside
        assert not (tmp_path / "experiments").exists()
        assert expman.open_run(inside).status == "finished"
    finally:
        assert c.stop() == 0, c.log()


def test_run_dir_with_no_collector_answering_is_an_error_not_a_path(root, short_dir, monkeypatch):
    monkeypatch.setattr(experiment, "RUN_DIR_WAIT_S", 0.5)
    exp = expman.start_experiment("e", "nobody", root=root, collector=f"ipc://{short_dir}/nobody.sock")
    with pytest.raises(expman.ExpmanError, match="has not answered"):
        exp.run_dir
    assert exp.finish(timeout=0.2) is False
    assert list(root.iterdir()) == []


def test_local_mode_knows_its_run_dir_at_once(root):
    with expman.start_experiment("e", "local", root=root) as exp:
        assert exp.run_dir == root / "e" / f"local-{exp.uid}"
    assert exp.run_dir.is_dir()
