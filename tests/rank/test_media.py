"""Media end to end: images, histograms, tables and audio from two ranks through a real
collector process, read back through `Run`, DuckDB and Polars."""

from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import expman
from _helpers import wait_for
from conftest import start_collector

RANK_SCRIPT = '''
import sys
import numpy as np
import expman

rank = int(sys.argv[1])
rng = np.random.default_rng(rank)
with expman.start_experiment("media", "two-ranks", root=sys.argv[2], collector=sys.argv[3], run_id="mediarun01",
                             rank=rank, world_size=2, code_dir=False, encrypt_artifacts=sys.argv[4] == "1") as exp:
    for step in range(3):
        exp.log_image("samples", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), step=step,
                      caption=f"rank {rank} step {step}")
        exp.log_histogram("weights", rng.normal(size=1000), step=step, bins=16)
        exp.log_metric("loss", 1.0 / (step + 1), step=step)
    exp.log_image("gray", np.linspace(0, 1, 12 * 10).reshape(12, 10), step=0)       # floats in [0, 1]
    exp.log_image("rgba", np.full((4, 5, 4), 7, dtype=np.uint8), step=0)
    exp.log_histogram("given", step=0, edges=[0.0, 0.5, 2.0], counts=[rank, 3])
    exp.log_table("eval", [{"id": i, "text": f"r{rank}-{i}", "score": i / 10} for i in range(5)], step=2)
    exp.log_audio("tone", (np.sin(np.arange(1600) / (3 + rank)) * 0.5).astype(np.float32), 16000, step=1)
    exp.log_audio("pcm", (np.arange(800, dtype=np.int16).reshape(400, 2) - 400), 8000, step=1)
    stats = exp.stats()
    assert stats["artifacts_failed"] == 0, stats
print("RUN-DIR", exp.run_dir)
'''


def _run_ranks(root: Path, endpoint: str | list[str], tmp_path: Path, encrypt: bool = False) -> expman.Run:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    endpoints = endpoint if isinstance(endpoint, list) else [endpoint, endpoint]
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(root), endpoints[rank], "1" if encrypt else "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out)
    return expman.open_run(outs[0].split("RUN-DIR ")[1].strip())


def _expected(rank: int) -> dict[str, list]:
    """What RANK_SCRIPT logs from `rank`, computed the same way."""
    rng = np.random.default_rng(rank)
    images, values = [], []
    for _step in range(3):
        images.append(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        values.append(rng.normal(size=1000))
    return {"images": images, "values": values}


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_every_kind_round_trips_from_two_ranks(root, short_dir, tmp_path, key_file, encrypt):
    c = start_collector(root, short_dir, None, "--key-file", str(key_file))
    try:
        run = _run_ranks(root, c.endpoint, tmp_path, encrypt)
    finally:
        assert c.stop() == 0, c.log()
    index = run.media()
    rows = index.to_pylist()
    assert {(r["key"], r["rank"]) for r in rows} >= {("samples", 0), ("samples", 1), ("eval", 1), ("tone", 0)}
    assert all(r["encrypted"] == encrypt for r in rows)
    for rank in (0, 1):
        want = _expected(rank)
        # images: pixel-exact, per step and rank, with their captions
        for step in range(3):
            got = run.read_media("samples", step=step, rank=rank, as_="numpy")
            assert np.array_equal(got, want["images"][step])
        (row,) = [r for r in rows if r["key"] == "samples" and r["rank"] == rank and r["step"] == 1]
        assert (row["kind"], row["format"], row["width"], row["height"], row["channels"], row["caption"]) == (
            "image", "png", 32, 24, 3, f"rank {rank} step 1")
        png = run.read_media("samples", step=1, rank=rank)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and hashlib.sha256(png).hexdigest() == row["sha256"]
        gray = run.read_media("gray", rank=rank, as_="numpy")
        assert gray.shape == (12, 10) and np.array_equal(
            gray, (np.linspace(0, 1, 120).reshape(12, 10).astype(np.float32) * 255 + 0.5).astype(np.uint8))
        assert np.array_equal(run.read_media("rgba", rank=rank, as_="numpy"), np.full((4, 5, 4), 7, np.uint8))
        # histograms: exact counts, as numpy bins the same values
        hist = [h for h in run.histograms("weights").to_pylist() if h["rank"] == rank]
        assert [h["step"] for h in hist] == [0, 1, 2]
        for h, values in zip(hist, want["values"]):
            counts, edges = np.histogram(values, bins=16)
            assert h["counts"] == counts.astype(float).tolist() and h["edges"] == edges.tolist()
            assert (h["count"], h["nonfinite"], h["min"], h["max"]) == (1000, 0, values.min(), values.max())
        (given,) = [h for h in run.histograms("given").to_pylist() if h["rank"] == rank]
        assert (given["edges"], given["counts"]) == ([0.0, 0.5, 2.0], [float(rank), 3.0])
        # tables: equal to what was logged
        expected_table = pa.Table.from_pylist([{"id": i, "text": f"r{rank}-{i}", "score": i / 10} for i in range(5)])
        assert run.table("eval", rank=rank).equals(expected_table)
        assert run.table("eval", step=2, rank=rank).equals(expected_table)
        # audio: float samples exactly, int16 PCM exactly, both channels
        samples, rate = run.read_media("tone", rank=rank, as_="numpy")
        assert rate == 16000 and np.array_equal(samples, (np.sin(np.arange(1600) / (3 + rank)) * 0.5).astype(np.float32))
        pcm, rate = run.read_media("pcm", rank=rank, as_="numpy")
        assert rate == 8000 and np.array_equal(pcm, np.arange(800, dtype=np.int16).reshape(400, 2) - 400)
    # metrics logged alongside are untouched
    assert sorted(set(run.metrics(keys="loss")["rank"].to_pylist())) == [0, 1]
    # media objects live in the artifact store, encrypted at rest when asked; no staging left
    objects = [p for p in (run.path / "artifacts" / "objects").rglob("*") if p.is_file()]
    assert objects and all(p.name.endswith(".expa") == encrypt for p in objects)
    assert not any(p.is_file() for p in (run.path / "artifacts" / ".incoming").rglob("*"))
    assert run.artifacts() == []  # media are not artifacts in the manifest


def test_indexes_are_open_parquet_for_duckdb_and_polars(root, short_dir, tmp_path, key_file):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    c = start_collector(root, short_dir, None, "--key-file", str(key_file))
    try:
        run = _run_ranks(root, c.endpoint, tmp_path)
    finally:
        assert c.stop() == 0, c.log()  # a stopped collector has rolled its journal into parts
    assert not list((run.path / "media" / ".journal").glob("*.jsonl"))
    index_glob = str(run.path / "media" / "index" / "*.parquet")
    hist_glob = str(run.path / "media" / "histograms" / "*.parquet")
    con = duckdb.connect()
    got = con.execute(f"SELECT rank, step, width, height, file FROM '{index_glob}' "
                      "WHERE key = 'samples' ORDER BY rank, step").fetchall()
    assert [(r, s, w, h) for r, s, w, h, _ in got] == [(r, s, 32, 24) for r in (0, 1) for s in range(3)]
    assert all((run.path / f).is_file() for *_, f in got)  # `file` is relative to the run folder
    total = con.execute(f"SELECT rank, step, list_sum(counts) FROM '{hist_glob}' WHERE key = 'weights' "
                        "ORDER BY rank, step").fetchall()
    assert total == [(r, s, 1000.0) for r in (0, 1) for s in range(3)]
    frame = pl.read_parquet(index_glob).filter(pl.col("kind") == "table")
    assert sorted(frame["rank"].to_list()) == [0, 1] and set(frame["rows"].to_list()) == {5}
    given = pl.read_parquet(hist_glob).filter(pl.col("key") == "given").sort("rank")
    assert given["counts"].to_list() == [[0.0, 3.0], [1.0, 3.0]]


def test_a_live_run_reads_rows_the_collector_has_not_rolled_yet(root, tmp_path):
    """Before a Parquet part exists, the journal's rows are in run.media() already."""
    with expman.start_experiment("live", "r", root=root, code_dir=False) as exp:
        exp.log_image("x", np.zeros((2, 2), np.uint8), step=5)
        exp.log_histogram("h", [1.0, 2.0, float("nan")], step=5, bins=2)
        wait_for(lambda: exp.stats()["artifacts_stored"] == 2, timeout=60)
        run = expman.open_run(exp.run_dir)
        assert run.media()["step"].to_pylist() == [5]
        (h,) = run.histograms().to_pylist()
        assert (h["counts"], h["nonfinite"]) == ([1.0, 1.0], 1)
        assert list((exp.run_dir / "media" / ".journal").glob("*.jsonl"))


def test_latest_step_and_clear_errors(root):
    with expman.start_experiment("e", "errors", root=root, code_dir=False) as exp:
        for step in (1, 4, 2):
            exp.log_image("img", np.full((2, 3), step, np.uint8), step=step)
        with pytest.raises(ValueError, match="'bad'.*shape"):
            exp.log_image("bad", np.zeros((2, 3, 7), np.uint8))
        with pytest.raises(ValueError, match="'bad'.*0..255"):
            exp.log_image("bad", np.full((2, 2), 300))
        with pytest.raises(TypeError, match="'bad'.*complex"):
            exp.log_image("bad", np.zeros((2, 2), np.complex64))
        with pytest.raises(ValueError, match="'h'.*edges must be one longer"):
            exp.log_histogram("h", edges=[0, 1], counts=[1, 2])
        with pytest.raises(ValueError, match="'h'.*not both"):
            exp.log_histogram("h", [1.0], edges=[0, 1], counts=[1])
        with pytest.raises(ValueError, match="'a'.*sample_rate"):
            exp.log_audio("a", np.zeros(10, np.float32), 0)
        with pytest.raises(TypeError, match="'t'.*list of dicts"):
            exp.log_table("t", 42)
        with pytest.raises(FileNotFoundError):
            exp.log_image("missing", "/nonexistent/file.png")
        exp.log_image("odd/../key\\with\tall", np.zeros((1, 1), np.uint8))  # any metric key works
    run = expman.open_run(exp.run_dir)
    assert run.read_media("odd/../key\\with\tall").startswith(b"\x89PNG")
    assert int(run.read_media("img", as_="numpy")[0, 0]) == 4  # the latest step, not the last logged
    assert int(run.read_media("img", step=2, as_="numpy")[0, 0]) == 2
    with pytest.raises(expman.ExpmanError, match="no step 3.*1, 2, 4"):
        run.read_media("img", step=3)
    with pytest.raises(expman.ExpmanError, match="nothing from rank 1"):
        run.read_media("img", rank=1)
    with pytest.raises(expman.ExpmanError, match="no media 'nope'.*img"):
        run.read_media("nope")
    with pytest.raises(ValueError, match="as_="):
        run.read_media("img", as_="arrow")


def test_image_inputs_pil_torch_and_files(root, tmp_path):
    from PIL import Image

    torch = pytest.importorskip("torch")
    rgb = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
    path = tmp_path / "pic.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    with expman.start_experiment("e", "inputs", root=root, code_dir=False) as exp:
        exp.log_image("pil", Image.fromarray(rgb), step=0)
        exp.log_image("torch", torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, step=0)  # CHW floats
        exp.log_image("file", path, step=0, caption="from disk")
        exp.log_image("chw-numpy", np.ascontiguousarray(rgb.transpose(2, 0, 1)), step=0)
        exp.log_figure_from_path(path)
    run = expman.open_run(exp.run_dir)
    assert np.array_equal(run.read_media("pil", as_="numpy"), rgb)
    assert np.array_equal(run.read_media("torch", as_="numpy"), rgb)
    assert np.array_equal(run.read_media("chw-numpy", as_="numpy"), rgb)
    assert run.read_media("file") == path.read_bytes()  # a file is stored as it is
    rows = {r["key"]: r for r in run.media().to_pylist()}
    assert (rows["file"]["format"], rows["file"]["width"], rows["file"]["height"]) == ("jpeg", 5, 6)
    assert rows["figures/pic.jpg"]["sha256"] == rows["file"]["sha256"]  # one object, two index rows
    assert run.read_media("file", as_="pil").size == (5, 6)


def test_figures_from_matplotlib(root):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), dpi=40)
    ax.plot([1, 2, 3])
    with expman.start_experiment("e", "figs", root=root, code_dir=False) as exp:
        exp.log_figure("curve", fig, step=7)
        with pytest.raises(ValueError, match="PNG"):
            exp.log_figure("curve", fig, format="svg")
    row = expman.open_run(exp.run_dir).media("curve").to_pylist()[0]
    assert (row["step"], row["format"], row["width"], row["height"]) == (7, "png", 120, 80)


def test_a_file_that_is_not_an_image_is_refused_and_counted(root, tmp_path, caplog):
    bogus = tmp_path / "not-an-image.png"
    bogus.write_bytes(b"hello, not a png")
    with caplog.at_level(logging.ERROR, logger="expman"):
        with expman.start_experiment("e", "bogus", root=root, code_dir=False) as exp:
            exp.log_image("bogus", bogus, step=0)
            exp.log_image("fine", np.zeros((2, 2), np.uint8), step=0)
    assert exp.stats()["artifacts_failed"] == 1
    assert any("could not be encoded" in r.getMessage() for r in caplog.records)
    assert expman.open_run(exp.run_dir).media()["key"].to_pylist() == ["fine"]


def test_wandb_style_media_in_log(run_script, root):
    script = '''
import numpy as np
import expman as wandb

run = wandb.init(project="wb", name="media")
for step in range(2):
    wandb.log({"loss": 1.0 / (step + 1),
               "examples": [wandb.Image(np.full((4, 4, 3), step, np.uint8), caption=f"s{step}"),
                            wandb.Image(np.zeros((4, 4), np.uint8))],
               "w": wandb.Histogram(np.arange(10.0), num_bins=5),
               "given": wandb.Histogram(np_histogram=(np.array([1, 2]), np.array([0.0, 1.0, 2.0])))})
table = wandb.Table(columns=["id", "pred"], data=[[1, "cat"], [2, "dog"]])
table.add_data(3, "eel")
wandb.log({"preds": table, "clip": wandb.Audio(np.zeros(100, np.float32), sample_rate=8000),
           "movie": wandb.Video(np.zeros((3, 3, 4, 5), np.uint8) + np.arange(3, dtype=np.uint8)[:, None, None, None],
                                fps=2)})
wandb.finish()
print("RUN-DIR", run.dir)
'''
    result = run_script(script, env={"EXPMAN_ROOT": str(root)}, check=True)
    run = expman.open_run(result.stdout.split("RUN-DIR ")[1].strip())
    assert run.metrics(keys="loss")["step"].to_pylist() == [0, 1]
    keys = {(r["key"], r["step"]) for r in run.media().to_pylist()}
    assert keys == {("examples/0", 0), ("examples/1", 0), ("examples/0", 1), ("examples/1", 1),
                    ("preds", 2), ("clip", 2), ("movie", 2)}
    assert run.read_media("movie", as_="numpy").shape == (3, 4, 5, 3)
    assert int(run.read_media("examples/0", step=1, as_="numpy")[0, 0, 0]) == 1
    assert run.table("preds").to_pylist() == [{"id": 1, "pred": "cat"}, {"id": 2, "pred": "dog"},
                                              {"id": 3, "pred": "eel"}]
    hist = {h["key"]: h for h in run.histograms().to_pylist() if h["step"] == 1}
    assert hist["w"]["counts"] == [2.0] * 5 and hist["given"]["counts"] == [1.0, 2.0]


def test_media_past_the_memory_budget_spill_and_still_land(root, monkeypatch):
    """Past MEDIA_BUDGET the bytes go to an unnamed spool file, never dropped."""
    from expman._rank import artifacts

    monkeypatch.setattr(artifacts, "MEDIA_BUDGET", 10_000)
    images = [np.full((40, 40, 3), i, np.uint8) for i in range(20)]  # 4800 bytes each
    with expman.start_experiment("e", "spill", root=root, code_dir=False) as exp:
        for i, image in enumerate(images):
            exp.log_image("img", image, step=i)
    assert exp.stats()["artifacts_stored"] == 20
    run = expman.open_run(exp.run_dir)
    for i in (0, 7, 19):
        assert np.array_equal(run.read_media("img", step=i, as_="numpy"), images[i])


def test_collector_killed_mid_stream_loses_and_doubles_nothing(root, short_dir, tmp_path):
    """kill -9 of the collector while images flow; a new collector on the same socket; every
    image is there exactly once, pixel-exact."""
    c = start_collector(root, short_dir)
    images = [np.full((16, 16, 3), i, np.uint8) for i in range(40)]
    exp = expman.start_experiment("e", "crash", root=root, collector=c.endpoint, code_dir=False)
    try:
        for i in range(20):
            exp.log_image("img", images[i], step=i)
            exp.log_histogram("h", np.arange(i + 1.0), step=i, bins=4)
        wait_for(lambda: exp.stats()["artifacts_stored"] >= 10, timeout=60)
        c.proc.kill()
        c.proc.wait()
        for i in range(20, 40):
            exp.log_image("img", images[i], step=i)
            exp.log_histogram("h", np.arange(i + 1.0), step=i, bins=4)
        c = start_collector(root, short_dir, c.endpoint)
        assert exp.finish(timeout=120)
    finally:
        assert c.stop() == 0, c.log()
    assert exp.stats()["artifacts_failed"] == 0
    run = expman.open_run(exp.run_dir)
    assert run.media("img")["step"].to_pylist() == list(range(40))
    assert run.histograms("h")["step"].to_pylist() == list(range(40))
    assert [sum(h) for h in run.histograms("h")["counts"].to_pylist()] == [i + 1.0 for i in range(40)]
    for i in (0, 19, 20, 39):
        assert np.array_equal(run.read_media("img", step=i, as_="numpy"), images[i])


def test_a_torn_journal_line_is_cut_before_new_rows(tmp_path):
    """A collector killed mid-append leaves half a line; the next one appends after a cut."""
    from expman.collector._media import MediaStore

    store = MediaStore(tmp_path, "w1")
    store.add("histograms", {"key": "h", "step": 0, "rank": 0, "host": "x", "time": 1.0, "edges": [0.0, 1.0],
                             "counts": [1.0], "count": 1, "nonfinite": 0, "min": 0.0, "max": 0.0, "sum": 0.0})
    store.sync()
    with open(store.journal_path, "a") as fh:
        fh.write('{"table": "histograms", "seq": 1, "key": "to')  # torn
    again = MediaStore(tmp_path, "w1")
    again.add("histograms", {"key": "h", "step": 1, "rank": 0, "host": "x", "time": 2.0, "edges": [0.0, 1.0],
                             "counts": [2.0], "count": 2, "nonfinite": 0, "min": 0.0, "max": 0.0, "sum": 0.0})
    again.sync()
    from expman._reader.media import histograms

    assert histograms(tmp_path)["step"].to_pylist() == [0, 1]  # from the journal
    again.close()
    assert not again.journal_path.exists()
    assert histograms(tmp_path)["counts"].to_pylist() == [[1.0], [2.0]]  # from the part


def test_video_frames_round_trip_as_animated_png(root, tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (5, 6, 8, 3), dtype=np.uint8)
    frames[2] = frames[1]  # a repeated frame comes back repeated
    gray = rng.integers(0, 256, (4, 3, 2), dtype=np.uint8)
    gif = tmp_path / "clip.gif"
    from PIL import Image

    pics = [Image.fromarray(f) for f in frames]
    pics[0].save(gif, save_all=True, append_images=pics[1:], duration=100)
    with expman.start_experiment("e", "video", root=root, code_dir=False) as exp:
        exp.log_video("clip", frames, fps=10, step=1)
        exp.log_video("gray", gray, step=1)
        exp.log_video("torch", torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255, fps=2.5, step=1)
        exp.log_video("file", gif, fps=10, step=1)
        with pytest.raises(ValueError, match="'bad'.*fps"):
            exp.log_video("bad", frames, fps=0)
        with pytest.raises(ValueError, match="'bad'.*must end in"):
            exp.log_video("bad", tmp_path / "clip.txt")
        writer = expman.SummaryWriter(exp=exp)
        writer.add_video("tb", np.stack([frames.transpose(0, 3, 1, 2)] * 2)[:, :3], 2, fps=4)  # N=2, T=3, CHW
    run = expman.open_run(exp.run_dir)
    rows = {r["key"]: r for r in run.media().to_pylist()}
    assert (rows["clip"]["format"], rows["clip"]["frames"], rows["clip"]["fps"], rows["clip"]["width"],
            rows["clip"]["height"]) == ("apng", 5, 10.0, 8, 6)
    assert np.array_equal(run.read_media("clip", as_="numpy"), frames)
    assert np.array_equal(run.read_media("gray", as_="numpy"), gray)
    assert np.array_equal(run.read_media("torch", as_="numpy"), frames)
    assert run.read_media("file") == gif.read_bytes() and rows["file"]["frames"] == Image.open(gif).n_frames
    tb = run.read_media("tb", step=2, as_="numpy")
    assert tb.shape == (3, 6, 16, 3) and np.array_equal(tb[:, :, :8], frames[:3]) and np.array_equal(
        tb[:, :, 8:], frames[:3])


GOOD_IMAGE = {"kind": "image", "key": "k", "step": 1, "encoding": "raw", "dtype": "uint8", "shape": [2, 3, 3],
              "layout": "HWC"}


@pytest.mark.parametrize("change,size,reason", [
    ({"kind": "model"}, 18, "kind"),
    ({"key": ""}, 18, "key"),
    ({"key": "x" * 2000}, 18, "key"),
    ({"step": 1.5}, 18, "step"),
    ({"caption": 7}, 18, "caption"),
    ({"encoding": "jpeg-xl"}, 18, "encoding"),
    ({"dtype": "float64"}, 18, "dtype"),
    ({"shape": [2, -3, 3]}, 18, "shape"),
    ({"shape": [2, 3, 3]}, 19, "not 19 bytes"),
    ({"layout": "CHW"}, 18, "channels"),
    ({"layout": "NHWC"}, 18, "layout"),
    ({"shape": [100_000, 100_000, 3]}, 30_000_000_000, "limit"),
    ({"kind": "audio", "dtype": "int16", "shape": [3, 3], "sample_rate": 0}, 18, "sample_rate"),
    ({"kind": "histogram", "encoding": "values", "bins": 0}, 16, "bins"),
    ({"kind": "histogram", "encoding": "edges-counts"}, 16, "edges"),
    ({"kind": "video", "shape": [1, 2, 3, 3], "layout": "THWC", "fps": "4"}, 18, "fps"),
    ({"kind": "video", "encoding": "file", "format": "exe", "fps": 4.0}, 18, "format"),
])
def test_the_collector_refuses_bad_descriptors(change, size, reason):
    from expman._errors import ProtocolError
    from expman.collector._media import check_descriptor

    with pytest.raises(ProtocolError, match=reason) as err:
        check_descriptor({**GOOD_IMAGE, **change}, size)
    assert err.value.reason == "bad-values"
    assert check_descriptor(dict(GOOD_IMAGE), 18)


def test_a_hostile_media_frame_is_rejected_and_the_collector_keeps_serving(root, short_dir):
    """A frame a rank would never send: its media descriptor lies about the payload."""
    import zmq

    from expman._wire import frames as proto

    c = start_collector(root, short_dir)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(c.endpoint)
    try:
        envelope = dict(run="feedf00d", host="h", rank=0, sender="x" * 32, sent_at=1.0)
        sock.send(proto.encode_frame(proto.HELLO, seq=0, body={"experiment": "hostile", "name": "r", "world_size": 1},
                                     **envelope))
        assert sock.poll(20_000) and proto.decode_ack(sock.recv()).seqs == [0]
        data = b"\x00" * 10
        body = proto.artifact_body(0, 0, data, True, name="media/image/k", size=len(data), chunk=proto.ARTIFACT_CHUNK_BYTES,
                                   encrypt=False, logged_at=1.0, sha256=hashlib.sha256(data).hexdigest(),
                                   media={**GOOD_IMAGE, "shape": [1000, 1000, 3]})
        sock.send(proto.encode_frame(proto.ARTIFACT, seq=1, body=body, **envelope))
        assert sock.poll(20_000)
        ack = proto.decode_ack(sock.recv())
        assert ack.seqs == [1] and "is not 10 bytes" in ack.info[1]["rejected"]
    finally:
        sock.close(0)
        assert c.stop() == 0, c.log()
    assert "bad-values" in c.log()


def test_with_no_collector_media_fill_memory_then_disk_then_are_refused_never_raised(root, short_dir, monkeypatch,
                                                                                     caplog):
    from expman._rank import artifacts

    monkeypatch.setattr(artifacts, "MEDIA_BUDGET", 10_000)
    monkeypatch.setattr(artifacts, "MEDIA_SPILL_BYTES", 20_000)
    monkeypatch.setattr(artifacts, "WINDOW_BYTES", 1)  # one unacknowledged item in flight at most
    with caplog.at_level(logging.ERROR, logger="expman"):
        exp = expman.start_experiment("e", "down", root=root, collector=f"ipc://{short_dir}/nothing.sock",
                                      code_dir=False, finish_timeout=1)
        for i in range(20):  # 4800 bytes each: <= 1 sent, 2 in memory, 4 in the spill file, the rest refused
            exp.log_image("img", np.full((40, 40, 3), i, np.uint8), step=i)
        refused = exp.stats()["artifacts_failed"]
        assert 13 <= refused <= 14
        assert not exp.finish(timeout=1)
    assert sum("media wait in memory" in r.getMessage() for r in caplog.records) == refused


def test_hostile_payloads_only_ever_raise_protocol_errors():
    """Whatever bytes follow a descriptor that passed its checks, encoding either works or
    refuses the item with a ProtocolError; it never raises anything else."""
    from expman._errors import ProtocolError
    from expman.collector._media import check_descriptor, encode

    rng = np.random.default_rng(7)
    cases = [
        ({"kind": "image", "key": "k", "encoding": "file"}, None),
        ({"kind": "video", "key": "k", "encoding": "file", "format": "gif", "fps": 4.0}, None),
        ({"kind": "table", "key": "k", "encoding": "arrow-ipc"}, None),
        ({"kind": "histogram", "key": "k", "encoding": "values", "bins": 7}, 8),
        ({"kind": "histogram", "key": "k", "encoding": "edges-counts"}, 24),
        ({**GOOD_IMAGE, "dtype": "float32", "shape": [3, 2, 4]}, 96),
        ({"kind": "audio", "key": "k", "encoding": "raw", "dtype": "float32", "shape": [6, 1], "sample_rate": 8000}, 24),
    ]
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((2, 2), np.uint8)).save(png, format="PNG")
    for desc, size in cases:
        for trial in range(40):
            n = size if size is not None else int(rng.integers(0, 200))
            payload = rng.bytes(n)
            if trial % 4 == 0 and size is None:
                payload = png.getvalue()[: int(rng.integers(0, len(png.getvalue())))]  # truncated real files
            if trial % 5 == 0 and size is not None:
                payload = np.full(n // 8, rng.choice([np.nan, np.inf, -np.inf, 1e308]), "<f8").tobytes()
            check_descriptor(dict(desc), len(payload))
            try:
                encode(dict(desc), payload)
            except ProtocolError:
                pass


def test_tables_from_polars_arrow_and_columns_histograms_from_tensors(root):
    pl = pytest.importorskip("polars")
    torch = pytest.importorskip("torch")
    frame = pl.DataFrame({"id": [1, 2, 3], "label": ["a", "b", None], "p": [0.5, 0.25, 1.0]})
    arrow = pa.table({"x": pa.array([1, 2], pa.int8()), "when": pa.array([0, 1], pa.timestamp("ms"))})
    with expman.start_experiment("e", "tables", root=root, code_dir=False) as exp:
        exp.log_table("polars", frame, step=0)
        exp.log_table("arrow", arrow, step=0)
        exp.log_table("columns", {"a": [1, 2], "b": ["x", "y"]}, step=0)
        exp.log_table("empty", [], step=0)
        exp.log_histogram("tensor", torch.arange(8, dtype=torch.bfloat16), step=0, bins=2)
    run = expman.open_run(exp.run_dir)
    assert run.table("polars").equals(frame.to_arrow())
    assert run.table("arrow").equals(arrow)
    assert run.table("columns").to_pydict() == {"a": [1, 2], "b": ["x", "y"]}
    assert run.table("empty").num_rows == 0
    assert pl.from_arrow(run.table("polars")).equals(frame)
    assert run.histograms("tensor")["counts"].to_pylist() == [[4.0, 4.0]]


def test_big_endian_and_strided_arrays_arrive_as_their_values(root):
    """The call copies values, not memory: byte order and strides of the input do not leak."""
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    with expman.start_experiment("e", "layouts", root=root, code_dir=False) as exp:
        exp.log_histogram("h", np.arange(4, dtype=">f8"), step=0, bins=2)
        exp.log_audio("a", np.arange(4, dtype=">f4"), 8000, step=0)
        exp.log_image("strided", np.asfortranarray(image)[:, ::2], step=0)
        exp.log_image("ints", image.astype(">i4"), step=0)
    run = expman.open_run(exp.run_dir)
    assert run.histograms("h")["counts"].to_pylist() == [[2.0, 2.0]]
    assert run.read_media("a", as_="numpy")[0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert np.array_equal(run.read_media("strided", as_="numpy"), image[:, ::2])
    assert np.array_equal(run.read_media("ints", as_="numpy"), image)


def test_two_collectors_on_a_shared_root_write_one_index_each(root, short_dir, tmp_path):
    """Rank 0 and rank 1 reach different collectors (hosts sharing a filesystem): each writes
    its own index parts; the reader merges them."""
    a = start_collector(root, short_dir, f"ipc://{short_dir}/a.sock", "--name", "node-a")
    b = start_collector(root, short_dir, f"ipc://{short_dir}/b.sock", "--name", "node-b")
    try:
        run = _run_ranks(root, [a.endpoint, b.endpoint], tmp_path)
    finally:
        assert a.stop() == 0, a.log()
        assert b.stop() == 0, b.log()
    parts = sorted(p.name.split("-0")[0] for p in (run.path / "media" / "index").glob("*.parquet"))
    assert parts == ["node-a", "node-b"]
    assert {(r["key"], r["rank"]) for r in run.media("samples").to_pylist()} == {("samples", 0), ("samples", 1)}
    for rank in (0, 1):
        assert np.array_equal(run.read_media("samples", step=2, rank=rank, as_="numpy"), _expected(rank)["images"][2])
    assert sorted(set(run.histograms("weights")["rank"].to_pylist())) == [0, 1]


def test_a_rank_without_pillow_is_told_once(monkeypatch, caplog):
    import importlib.util

    from expman._rank import media

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else real(name, *a))
    monkeypatch.setattr(media, "_pillow_checked", False)
    with caplog.at_level(logging.WARNING, logger="expman"):
        media._check_pillow("image")
        media._check_pillow("image")
    assert [r.getMessage() for r in caplog.records if "Pillow" in r.getMessage()] == [
        "expman: Pillow is not installed, so a collector in this environment refuses images; "
        "pip install 'expman[media]'"]
