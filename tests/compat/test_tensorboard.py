"""TensorBoard interop: `expman export -f tensorboard` files load in TensorBoard's own reader;
`expman import` reads TensorBoard scalars (ours and other writers') into a new run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


def _write_scalars(folder: Path, tag: str, values: list[float]) -> None:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(folder))
    for step, value in enumerate(values):
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
        writer.add_event(Event(wall_time=1.7e9 + step, step=step, summary=summary))
    writer.close()


def _points(run: expman.Run) -> dict[tuple[str, int], float]:
    table = run.metrics()
    return {(str(k), s): v for k, s, v in zip(table["key"].to_pylist(), table["step"].to_pylist(),
                                              table["value"].to_pylist())}


def test_import_makes_one_run_per_run_folder_and_keeps_hparams(root, tmp_path, capsys):
    """A log folder with one folder per run (each with train/ and val/ inside, as Keras and
    many scripts write them) becomes one expman run per run folder; add_hparams parameters
    become the run's parameters; what is not a scalar is reported as skipped."""
    torch_tb = pytest.importorskip("torch.utils.tensorboard")
    logdir = tmp_path / "logs"
    for run, offset in (("run_a", 0.0), ("run_b", 10.0)):
        _write_scalars(logdir / run / "train", "loss", [offset + s for s in range(5)])
        _write_scalars(logdir / run / "val", "loss", [offset + 1 + s for s in range(5)])
    with torch_tb.SummaryWriter(str(logdir / "run_c")) as writer:  # PyTorch's writer: new-style scalars, hparams
        writer.add_scalar("acc", 0.5, 3, new_style=True)
        writer.add_scalar("acc2", 0.25, 4)
        writer.add_histogram("weights", np.array([0.1, 0.2, 0.3]), 0)
        writer.add_text("note", "text has no expman kind", 0)
        writer.add_hparams({"lr": 0.01, "optimizer": "adam", "layers": 3}, {"hparam/final_acc": 0.75})
    assert main(["import", str(logdir), "-e", "tb", "--root", str(root)]) == 0
    out, err = capsys.readouterr()
    runs = {run.info["name"]: run for run in expman.list_runs(root, experiment="tb")}
    assert sorted(runs) == ["run_a", "run_b", "run_c"]
    for name, run in runs.items():
        assert run.status == "finished" and run.params["imported_from"] == str((logdir / name).resolve())
        assert f"expman show {run.id} --root {root}" in out
    a, b = _points(runs["run_a"]), _points(runs["run_b"])
    assert a[("train/loss", 4)] == 4.0 and a[("val/loss", 0)] == 1.0 and len(a) == 10
    assert b[("train/loss", 0)] == 10.0 and len(b) == 10
    c = _points(runs["run_c"])
    assert c[("acc", 3)] == 0.5 and c[("acc2", 4)] == 0.25 and c[("hparam/final_acc", 0)] == 0.75
    assert {k: runs["run_c"].params[k] for k in ("lr", "optimizer", "layers")} == {"lr": 0.01, "optimizer": "adam",
                                                                                  "layers": 3}
    assert "3 hparams" in out
    assert "skipped 1 text tags" in err
    (hist,) = runs["run_c"].histograms("weights").to_pylist()  # PyTorch's histogram came along
    assert sum(hist["counts"]) == 3 and hist["edges"][0] <= 0.1 and hist["edges"][-1] >= 0.3


def test_import_of_one_run_keeps_its_folders_as_key_prefixes(root, tmp_path):
    """A folder that holds one run's event files (directly or in rank<N>/) is one run."""
    logdir = tmp_path / "single"
    _write_scalars(logdir, "loss", [1.0, 2.0])
    _write_scalars(logdir / "eval", "acc", [0.5])
    assert main(["import", str(logdir), "--name", "imported", "--root", str(root)]) == 0
    (run,) = expman.list_runs(root, experiment="default")
    assert run.info["name"] == "imported"
    assert _points(run) == {("loss", 0): 1.0, ("loss", 1): 2.0, ("eval/acc", 0): 0.5}


def test_import_errors(root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["import", str(tmp_path / "missing"), "--root", str(root)])
    assert exited.value.code == 2 and "missing is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), "--root", str(root)]) == 1
    assert "no TensorBoard event files" in capsys.readouterr().err
    for run in ("a", "b"):
        _write_scalars(tmp_path / "two" / run, "loss", [1.0])
    assert main(["import", str(tmp_path / "two"), "--name", "x", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "holds 2 TensorBoard runs (a, b)" in err and len(err.strip().splitlines()) == 1


def test_export_numbers_steps_of_stepless_points_on_from_their_key(root, tmp_path):
    """Points logged without a step continue from the last step of their key and rank."""
    from expman._compat.tensorboard import _fill_steps
    import numpy as np

    keys = np.array([0, 1, 0, 0, 1, 2, 2])
    steps = np.array([5, -1, -1, 9, -1, -1, -1])
    missing = steps == -1
    assert _fill_steps(keys, steps, missing).tolist() == [5, 0, 6, 9, 1, 0, 1]


def test_export_writes_the_events_tensorboards_own_writer_writes(tmp_path):
    """Our numpy event files frame and checksum each record as TFRecord does, and every record
    parses to the Event TensorBoard's own writer makes (ours spells out zero fields and pads
    steps to one varint width per tag, which protobuf readers accept)."""
    import struct

    import numpy as np
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from expman._compat.event_files import ScalarEventFile

    tags = [b"loss", b"a/much/longer/tag/" + b"x" * 150]  # lengths past one varint byte
    index = np.array([0, 1, 0, 1, 0, 0])
    steps = np.array([0, 1, 300, 2**40, -3, 7])
    values = np.array([0.5, -1.25, 3.0, np.inf, np.nan, 0.0], dtype=np.float32)
    wall = np.array([1.7e9, 1.7e9 + 0.25, 1.7e9 + 1, 1.7e9 + 2, 1.7e9 + 3, 1.7e9 + 4])
    with ScalarEventFile(tmp_path / "ours", wall_time=1.7e9) as events:
        events.write(tags, index[:4], steps[:4], values[:4], wall[:4])
        events.write(tags, index[4:], steps[4:], values[4:], wall[4:])
    (ours,) = (tmp_path / "ours").iterdir()
    data, records = ours.read_bytes(), []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        assert struct.unpack("<I", data[8:12])[0] == masked_crc32c(data[:8])
        assert struct.unpack("<I", data[12 + length:16 + length])[0] == masked_crc32c(data[12:12 + length])
        records.append(Event.FromString(data[12:12 + length]))
        data = data[16 + length:]
    expected = [Event(wall_time=1.7e9, file_version="brain.Event:2")]
    for batch in ([0, 2, 1, 3], [4, 5]):  # each write: a tag's points in order, tags in order of appearance
        for i in batch:
            summary = Summary(value=[Summary.Value(tag=tags[index[i]].decode(), simple_value=values[i])])
            expected.append(Event(wall_time=wall[i], step=int(steps[i]), summary=summary))
    assert [str(r) for r in records] == [str(e) for e in expected]  # str: NaN != NaN in ==


def _media_run(root: Path) -> Path:
    """Two ranks' images, histograms, audio (and a table, which TensorBoard has no kind for)."""
    pytest.importorskip("PIL")
    from expman._rank.start import _local_collector

    endpoint = _local_collector(root, None).endpoint
    exps = [expman.start_experiment("tb", "media", root=root, rank=r, world_size=2, run_id="tbmedia01", collector=endpoint)
            for r in (0, 1)]
    for rank, exp in enumerate(exps):
        for step in (0, 5):
            exp.log_image("samples", _pixels(rank, step), step=step)
            exp.log_histogram("weights", step=step, edges=[-1.0, 0.0, 0.5, 2.0], counts=[rank, step, 3])
        exp.log_metric("loss", 0.5, step=5)
    exps[0].log_audio("tone", (np.arange(800, dtype=np.int16) - 400), 8000, step=5)
    exps[0].log_table("eval", [{"id": 1}], step=5)
    for exp in exps:
        assert exp.finish()
    wait_for(lambda: expman.open_run(exps[0].run_dir).media().num_rows == 6, 30, "the media to land")
    return exps[0].run_dir


def _pixels(rank: int, step: int) -> np.ndarray:
    image = np.zeros((6, 9, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[:3, :, 2] = 40 * rank, step * 20, 255
    return image


def test_export_and_import_images_histograms_and_audio(root, tmp_path, capsys):
    """Exported images, histograms and audio are what TensorBoard's own reader shows, and
    `expman import` brings them back pixel-, count- and sample-exact; tables are counted as skipped."""
    import io

    from PIL import Image

    run_dir = _media_run(root)
    out = tmp_path / "tb"
    assert main(["export", "tbmedia01", "--root", str(root), "--format", "tensorboard", "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "wrote 2 scalars, 4 images, 4 histograms, 1 audio of 2 ranks" in said and "1 tables and videos skipped" in said
    for rank in (0, 1):
        acc = ea.EventAccumulator(str(out / f"rank{rank}"), size_guidance={ea.IMAGES: 0, ea.HISTOGRAMS: 0, ea.AUDIO: 0})
        acc.Reload()
        tags = acc.Tags()
        assert tags["images"] == ["samples"] and tags["histograms"] == ["weights"] and tags["scalars"] == ["loss"]
        assert tags["audio"] == (["tone"] if rank == 0 else [])
        images = acc.Images("samples")
        assert [(e.step, e.width, e.height) for e in images] == [(0, 9, 6), (5, 9, 6)]
        for e, step in zip(images, (0, 5)):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(e.encoded_image_string))), _pixels(rank, step))
        hist = acc.Histograms("weights")[-1].histogram_value
        assert (hist.min, hist.max, hist.num) == (-1.0, 2.0, rank + 5 + 3)
        assert list(hist.bucket_limit) == [0.0, 0.5, 2.0] and list(hist.bucket) == [rank, 5, 3]
    tone = ea.EventAccumulator(str(out / "rank0"), size_guidance={ea.AUDIO: 0})
    tone.Reload()
    (clip,) = tone.Audio("tone")
    assert (clip.step, clip.sample_rate, clip.length_frames, clip.content_type) == (5, 8000, 800, "audio/wav")

    assert main(["import", str(out), "-e", "back", "--root", str(root)]) == 0
    said = capsys.readouterr().out
    assert "imported 2 scalars, 4 images, 4 histograms, 1 audio of 2 ranks" in said
    back = expman.list_runs(root, experiment="back")[0]
    for rank in (0, 1):
        for step in (0, 5):
            assert np.array_equal(back.read_media("samples", step, rank, as_="numpy"), _pixels(rank, step))
    original = expman.open_run(run_dir).histograms().select(["key", "step", "rank", "edges", "counts"])
    assert back.histograms().select(["key", "step", "rank", "edges", "counts"]).to_pylist() == original.to_pylist()
    samples, rate = back.read_media("tone", 5, 0, as_="numpy")
    assert rate == 8000 and np.array_equal(samples, np.arange(800, dtype=np.int16) - 400)
    assert back.media().num_rows == 5  # the table stayed behind


def test_import_reads_tf2_style_image_and_histogram_tensors(root, tmp_path, capsys):
    """TF2's summaries (tensors with the images / histograms plugin) come in as media too."""
    pytest.importorskip("PIL")
    import io

    from PIL import Image
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.histogram import metadata as histogram_metadata
    from tensorboard.plugins.image import metadata as image_metadata
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from tensorboard.util import tensor_util

    png = io.BytesIO()
    Image.fromarray(_pixels(1, 5)).save(png, format="PNG")
    image = tensor_util.make_tensor_proto(np.array([b"9", b"6", png.getvalue(), png.getvalue()], dtype=object))
    histogram = tensor_util.make_tensor_proto(np.array([[0.0, 1.0, 2.0], [1.0, 3.0, 4.0]]))
    writer = EventFileWriter(str(tmp_path / "tf2"))
    for tag, tensor, meta in (("pics", image, image_metadata.create_summary_metadata("", "")),
                              ("acts", histogram, histogram_metadata.create_summary_metadata("", ""))):
        value = Summary.Value(tag=tag, tensor=tensor, metadata=meta)
        writer.add_event(Event(wall_time=1.7e9, step=3, summary=Summary(value=[value])))
    writer.close()
    assert main(["import", str(tmp_path / "tf2"), "--name", "tf2", "--root", str(root)]) == 0
    (run,) = expman.list_runs(root, experiment="default")
    assert sorted(run.media()["key"].to_pylist()) == ["pics/0", "pics/1"]
    assert np.array_equal(run.read_media("pics/1", 3, as_="numpy"), _pixels(1, 5))
    (hist,) = run.histograms("acts").to_pylist()
    assert (hist["step"], hist["edges"], hist["counts"]) == (3, [0.0, 1.0, 3.0], [2.0, 4.0])
