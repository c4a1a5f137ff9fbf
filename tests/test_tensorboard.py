"""TensorBoard interop: `expman export -f tensorboard` files load in TensorBoard's own reader;
`expman import` reads TensorBoard scalars (ours and other writers') into a new run."""

from __future__ import annotations

from pathlib import Path

import pytest

import expman
from expman._cli.main import main
from _helpers import wait_for

ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _two_rank_run(root: Path) -> Path:
    from expman._rank.start import _local_collector

    endpoint = _local_collector(root, None).endpoint  # one private collector (a job's shared one would linger)
    exps = [expman.start_experiment("tb", "ddp", root=root, rank=r, world_size=2, run_id="tbrun01", collector=endpoint)
            for r in (0, 1)]
    for step in range(25):
        for rank, exp in enumerate(exps):
            exp.log_metrics({"loss": 1.0 / (step + 1) + rank, "lr": 0.1}, step=step)
    exps[0].log_metric("note", "text is not exported", step=0)
    exps[1].log_metric("unstepped", 5.0)
    exps[1].log_metric("unstepped", 6.0)
    for exp in exps:
        assert exp.finish()
    wait_for(lambda: (exps[0].run_dir / "run.yaml").exists() and expman.open_run(exps[0].run_dir).status == "finished",
             10, "run.yaml to say finished")
    return exps[0].run_dir


def test_export_loads_in_tensorboards_reader(root, tmp_path, capsys):
    run_dir = _two_rank_run(root)
    out = tmp_path / "tb"
    assert main(["export", "tbrun01", "--root", str(root), "--format", "tensorboard", "-o", str(out)]) == 0
    assert "1 text points skipped" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["rank0", "rank1"]
    for rank in (0, 1):
        acc = ea.EventAccumulator(str(out / f"rank{rank}"), size_guidance={ea.SCALARS: 0})
        acc.Reload()
        assert set(acc.Tags()["scalars"]) == ({"loss", "lr"} | ({"unstepped"} if rank else set()))
        loss = acc.Scalars("loss")
        assert [e.step for e in loss] == list(range(25))
        assert loss[4].value == pytest.approx(0.2 + rank)
        assert loss[0].wall_time > 1e9
    acc = ea.EventAccumulator(str(out / "rank1"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("unstepped")] == [(0, 5.0), (1, 6.0)]

    # and back: import makes a new two-rank run with the same points
    assert main(["import", str(out), "-e", "back", "--root", str(root)]) == 0
    back = expman.list_runs(root, experiment="back")[0]
    assert back.status == "finished" and back.info["world_size"] == 2 and back.info["name"] == "tb"
    original = expman.open_run(run_dir).metrics(keys="loss")
    again = back.metrics(keys="loss")
    def points(t):  # simple_value is a float32
        return sorted((r, s, round(v, 5)) for r, s, v in zip(t["rank"].to_pylist(), t["step"].to_pylist(),
                                                              t["value"].to_pylist()))

    assert points(again) == points(original)


def test_import_other_writers_runs_as_key_prefixes(root, tmp_path):
    """Folders not named rank<N> are TensorBoard runs: their path prefixes the tag."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    logdir = tmp_path / "logs"
    for run, offset in (("train", 0.0), ("val", 1.0)):
        writer = EventFileWriter(str(logdir / run))
        for step in range(5):
            value = Summary(value=[Summary.Value(tag="loss", simple_value=offset + step)])
            writer.add_event(Event(wall_time=1.7e9 + step, step=step, summary=value))
        writer.close()
    torch_tb = pytest.importorskip("torch.utils.tensorboard")
    with torch_tb.SummaryWriter(str(logdir / "torch")) as writer:  # tensor-style (new_style) scalars too
        writer.add_scalar("acc", 0.5, 3, new_style=True)
        writer.add_scalar("acc2", 0.25, 4)
    assert main(["import", str(logdir), "--name", "imported", "--root", str(root)]) == 0
    run = expman.list_runs(root, experiment="default")[0]
    assert run.info["name"] == "imported" and run.params["imported_from"] == str(logdir.resolve())
    table = run.metrics()
    got = {(str(k), s): v for k, s, v in zip(table["key"].to_pylist(), table["step"].to_pylist(),
                                            table["value"].to_pylist())}
    assert got[("train/loss", 4)] == 4.0 and got[("val/loss", 0)] == 1.0
    assert got[("torch/acc", 3)] == 0.5 and got[("torch/acc2", 4)] == 0.25
    assert len(got) == 12


def test_import_errors(root, tmp_path, capsys):
    assert main(["import", str(tmp_path / "missing"), "--root", str(root)]) == 1
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), "--root", str(root)]) == 1
    assert "no TensorBoard event files" in capsys.readouterr().err
