"""`expman.SummaryWriter`: a TensorBoard-style script runs unchanged apart from the import line."""

from __future__ import annotations

import numpy as np
import pytest

import expman
from expman._compat.summary_writer import UNSUPPORTED

TB_SCRIPT = '''
import math
import numpy as np
from expman import SummaryWriter   # was: from torch.utils.tensorboard import SummaryWriter

writer = SummaryWriter("runs/sine_1", comment="_lr0.1")
for n_iter in range(20):
    writer.add_scalar("Loss/train", math.exp(-n_iter / 5), n_iter)
    writer.add_scalar("Loss/test", np.float32(math.exp(-n_iter / 6)), n_iter)
    writer.add_scalars("run_14h", {"xsinx": n_iter * math.sin(n_iter / 5), "xcosx": n_iter * math.cos(n_iter / 5)}, n_iter)
writer.add_text("notes", "first try", 0)
for i in range(3):
    writer.add_histogram("weights", np.arange(100) + i * 10, i)
writer.add_image("sample", np.full((3, 8, 10), 0.5, dtype=np.float32), 1)           # CHW floats
writer.add_image("hwc", np.arange(8 * 10 * 3, dtype=np.uint8).reshape(8, 10, 3), 1, dataformats="HWC")
writer.add_images("batch", np.zeros((5, 3, 4, 6), dtype=np.uint8), 2)                # NCHW -> 3x2 grid
writer.add_audio("tone", np.sin(np.arange(400) / 5)[None, :].astype(np.float32), 3, sample_rate=8000)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig = plt.figure(figsize=(2, 1), dpi=50)
plt.plot([0, 1], [1, 0])
writer.add_figure("curve", fig, 4)
writer.add_hparams({"lr": 0.1, "bsize": 32}, {"hparam/accuracy": 0.9, "hparam/loss": 0.1})
writer.flush()
writer.close()
print("RUN-DIR", writer.get_logdir())
'''


def test_tensorboard_style_script_runs_unchanged(run_script, root):
    result = run_script(TB_SCRIPT, env={"EXPMAN_ROOT": str(root)}, check=True)
    run = expman.open_run(result.stdout.split("RUN-DIR ")[1].strip())
    assert run.status == "finished"
    assert run.info["experiment"] == "runs" and run.info["name"] == "sine_1_lr0.1"
    assert run.params == {"lr": 0.1, "bsize": 32}
    assert run.metrics(keys="Loss/train")["step"].to_pylist() == list(range(20))
    assert run.metrics(keys="run_14h/xsinx").num_rows == 20
    assert run.metrics(keys="notes")["text"].to_pylist() == ["first try"]
    assert run.metrics(keys="hparam/accuracy")["value"].to_pylist() == [0.9]
    # histograms: 30 equal buckets over the values' range, one row per step
    hist = run.histograms("weights").to_pylist()
    assert [h["step"] for h in hist] == [0, 1, 2]
    last = hist[-1]
    assert len(last["counts"]) == 30 and sum(last["counts"]) == 100 and last["count"] == 100
    assert (last["min"], last["max"], last["edges"][0], last["edges"][-1]) == (20.0, 119.0, 20.0, 119.0)
    # images, figures and audio land in the media index
    media = {r["key"]: r for r in run.media().to_pylist()}
    assert sorted(media) == ["batch", "curve", "hwc", "sample", "tone"]
    assert (media["sample"]["width"], media["sample"]["height"], media["sample"]["channels"]) == (10, 8, 3)
    assert (run.read_media("sample", as_="numpy") == 128).all()
    assert (run.read_media("hwc", as_="numpy") == np.arange(240, dtype=np.uint8).reshape(8, 10, 3)).all()
    assert (media["batch"]["width"], media["batch"]["height"]) == (18, 8)  # 5 images of 6x4 in rows of 3
    assert (media["curve"]["format"], media["curve"]["width"], media["curve"]["height"]) == ("png", 100, 50)
    samples, rate = run.read_media("tone", as_="numpy")
    assert rate == 8000 and np.array_equal(samples, np.sin(np.arange(400) / 5).astype(np.float32))


def test_unsupported_methods_raise_naming_the_method(root):
    with expman.SummaryWriter(root=root) as writer:
        for name in UNSUPPORTED:
            with pytest.raises(NotImplementedError, match=name):
                getattr(writer, name)("tag", None)
        writer.add_histogram_raw("h", min=0, max=2, num=3, sum=3, sum_squares=5,
                                 bucket_limits=[1, 2], bucket_counts=[1, 2], global_step=0)
    run = expman.open_run(writer.get_logdir())
    (h,) = run.histograms("h").to_pylist()
    assert (h["edges"], h["counts"], h["step"]) == ([0.0, 1.0, 2.0], [1.0, 2.0], 0)
    assert run.status == "finished"
    with pytest.raises(NotImplementedError, match="purge_step"):
        expman.SummaryWriter(root=root, purge_step=3)


def test_writer_into_an_existing_run_and_failure_status(root):
    exp = expman.start_experiment("e", "mine", root=root)
    writer = expman.SummaryWriter(exp=exp)
    writer.add_scalar("x", 1.0, 0)
    writer.close()  # leaves the run open: it belongs to the caller
    assert exp.status == "running"
    exp.log_metric("y", 2.0, step=0)
    exp.finish()
    assert expman.open_run(exp.run_dir).metrics()["key"].to_pylist() == ["x", "y"]
    with pytest.raises(RuntimeError):
        with expman.SummaryWriter("tb/broken", root=root) as broken:
            raise RuntimeError("boom")
    assert expman.open_run(broken.get_logdir()).status == "failed"


def test_torch_tensors_are_accepted(root):
    torch = pytest.importorskip("torch")
    with expman.SummaryWriter("t/tensors", root=root) as writer:
        writer.add_scalar("loss", torch.tensor(0.25), 1)
        writer.add_histogram("w", torch.arange(10, dtype=torch.float32), 1, bins=5)
    run = expman.open_run(writer.get_logdir())
    assert run.metrics(keys="loss")["value"].to_pylist() == [0.25]
    assert run.histograms("w")["counts"].to_pylist() == [[2.0] * 5]
