"""Device tensors are logged without a sync: held at the call, read in batches by the sender.

This machine has no GPU, so CPU tensors stand in for device ones: the tests replace the one
predicate that says "this value lives on a device" (expman/_rank/values.py), and everything
after it (holding, batching, reading, ordering, failures) is the real code. A GPU host runs
benchmarks/bench_device_scalars.py for the real CUDA path.
"""

from __future__ import annotations

import pytest

import expman
from expman._rank import values

torch = pytest.importorskip("torch")


class Broken:
    """A 'device tensor' whose value can never be read (a failed kernel, say)."""

    device = "fake"

    def numel(self) -> int:
        return 1

    def detach(self) -> "Broken":
        return self

    def reshape(self, shape) -> "Broken":
        return self

    def clone(self) -> "Broken":
        return self

    def __float__(self) -> float:
        raise RuntimeError("device-side assert triggered")


@pytest.fixture
def as_device(monkeypatch):
    monkeypatch.setattr(values, "is_device_scalar", lambda v: isinstance(v, (torch.Tensor, Broken)))


def test_device_values_keep_their_values_steps_and_order(root, as_device):
    with expman.start_experiment("e", "device", root=root, code_dir=False) as exp:
        for step in range(2000):
            loss = torch.tensor(1.0 / (step + 1), dtype=torch.float32)
            exp.log_metric("loss", loss, step=step)
            exp.log_metrics({"grad_norm": torch.tensor([float(step)]), "lr": 0.1}, step=step)
    run = expman.open_run(exp.run_dir)
    loss = run.metrics(keys=["loss"])
    assert loss["step"].to_pylist() == list(range(2000))
    assert loss["value"].to_pylist() == [float(torch.tensor(1.0 / (s + 1), dtype=torch.float32)) for s in range(2000)]
    assert run.metrics(keys=["grad_norm"])["value"].to_pylist() == [float(s) for s in range(2000)]
    assert run.metrics(keys=["lr"]).num_rows == 2000
    assert exp.stats()["dropped"] == 0 and exp.stats()["acked"] == 6000


def test_a_tensor_changed_in_place_after_the_call_keeps_the_logged_value(root, as_device):
    exp = expman.start_experiment("e", "inplace", root=root, code_dir=False)
    acc = torch.zeros(())
    for step in range(50):
        acc.add_(1.0)  # the training loop keeps updating the same tensor
        exp.log_metric("running_total", acc, step=step)
    acc.zero_()
    assert exp.finish() is True
    assert expman.open_run(exp.run_dir).metrics()["value"].to_pylist() == [float(s + 1) for s in range(50)]


def test_a_tensor_that_cannot_be_read_costs_only_its_own_point(root, as_device, caplog):
    exp = expman.start_experiment("e", "broken", root=root, code_dir=False)
    exp.log_metric("loss", torch.tensor(0.5), step=0)
    exp.log_metric("loss", Broken(), step=1)
    exp.log_metric("loss", torch.tensor(0.25), step=2)
    exp.log_metric("acc", 0.9, step=2)
    assert exp.finish() is True
    run = expman.open_run(exp.run_dir)
    assert run.metrics(keys=["loss"])["step"].to_pylist() == [0, 2]
    assert run.metrics(keys=["acc"])["value"].to_pylist() == [0.9]
    assert exp.stats()["dropped"] == 1
    assert "could not be read" in caplog.text and "device-side assert" in caplog.text


def test_cpu_tensors_are_numbers_at_the_call():
    assert values.coerce_number("x", torch.tensor(2.5)) == 2.5  # the default predicate: CPU is not a device
