"""`expman.SummaryWriter`: a TensorBoard-style script runs unchanged apart from the import line."""

from __future__ import annotations

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
    # histograms: 30 buckets of counts with their upper edges, plus min/max/num/sum/sum_squares
    hist = run.metrics(keys=[f"weights/hist/count/{i:03d}" for i in range(30)])
    at_step_2 = [v for v, s in zip(hist["value"].to_pylist(), hist["step"].to_pylist()) if s == 2]
    assert len(at_step_2) == 30 and sum(at_step_2) == 100
    stats = {str(k): v for k, v, s in zip(*(run.metrics(keys=["weights/hist/min", "weights/hist/max",
                                                                "weights/hist/num"])[c].to_pylist()
                                              for c in ("key", "value", "step"))) if s == 2}
    assert stats == {"weights/hist/min": 20.0, "weights/hist/max": 119.0, "weights/hist/num": 100.0}
    upper = run.metrics(keys="weights/hist/upper/029")
    assert upper["value"].to_pylist()[-1] == 119.0


def test_unsupported_methods_raise_naming_the_method(root):
    with expman.SummaryWriter(root=root) as writer:
        for name in UNSUPPORTED:
            with pytest.raises(NotImplementedError, match=name):
                getattr(writer, name)("tag", None)
        writer.add_histogram_raw("h", min=0, max=2, num=3, sum=3, sum_squares=5,
                                 bucket_limits=[1, 2], bucket_counts=[1, 2], global_step=0)
    run = expman.open_run(writer.get_logdir())
    assert run.metrics(keys="h/hist/count/001")["value"].to_pylist() == [2.0]
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
    assert run.metrics(keys="w/hist/count/004")["value"].to_pylist() == [2.0]
