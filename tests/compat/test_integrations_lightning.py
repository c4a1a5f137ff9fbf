"""`expman.integrations.lightning.ExpmanLogger` driven by a real Lightning Trainer on CPU."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import expman
from _helpers import wait_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="lightning is not installed (pip install 'expman[lightning]')")

MODULE = """
import argparse, pathlib, sys, torch, lightning as L
from torch.utils.data import DataLoader, TensorDataset
from expman.integrations.lightning import ExpmanLogger


class Tiny(L.LightningModule):
    def __init__(self, lr=0.05, optimizer={"name": "sgd", "momentum": 0.0}, out=pathlib.Path("/x/y"), fail_at=-1):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(2, 1)

    def on_fit_start(self):
        self.logger.log_hyperparams(argparse.Namespace(seed=7, data=argparse.Namespace(batch=4)))

    def training_step(self, batch, batch_idx):
        if self.global_step == self.hparams.fail_at:
            raise ValueError("loss went to the moon")
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train_loss", loss)
        self.log("rank_id", float(self.global_rank))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(64, 2, generator=g), torch.randn(64, 1, generator=g)), batch_size=4)


def trainer(logger, **kwargs):
    return L.Trainer(accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=sys.argv[2], **kwargs)
"""

DDP_SCRIPT = MODULE + """
if __name__ == "__main__":
    logger = ExpmanLogger("lightning", "ddp", root=sys.argv[1])
    t = trainer(logger, devices=2, strategy="ddp", max_steps=5)
    t.fit(Tiny(), loader())
    pathlib.Path(sys.argv[2]).mkdir(exist_ok=True)
    (pathlib.Path(sys.argv[2]) / f"version-{t.global_rank}").write_text(logger.version)
    codes = [proc.wait() for proc in getattr(t.strategy.launcher, "procs", [])]  # rank 0 started rank 1
    sys.exit(1 if any(codes) else 0)
"""

SINGLE_SCRIPT = MODULE + """
import pickle
if __name__ == "__main__":
    good = ExpmanLogger("lightning", "good", root=sys.argv[1])
    t = trainer(good, devices=1, max_steps=3, limit_val_batches=2)
    t.fit(Tiny(), loader())           # finalize("success")
    t.validate(t.lightning_module, loader())   # logs after finalize: the run is reopened
    bad = ExpmanLogger("lightning", "bad", root=sys.argv[1])
    try:
        trainer(bad, devices=1, max_steps=5).fit(Tiny(fail_at=2), loader())
    except ValueError:
        pass
    requeued = ExpmanLogger("lightning", "requeued", root=sys.argv[1])
    requeued.log_metrics({"x": 1.0}, step=0)
    clone = pickle.loads(pickle.dumps(requeued))   # as ddp_spawn does: the run id travels, not the run
    assert clone.version == requeued.version and clone._exp is None
    requeued.finalize("finished")     # Lightning's Slurm requeue handler
    interrupted = ExpmanLogger("lightning", "interrupted", root=sys.argv[1])
    interrupted.log_metrics({"x": 1.0}, step=0)
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted.finalize("failed")  # as Lightning's interrupt handler does
    print("VERSIONS", good.version, bad.version, requeued.version, interrupted.version)
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment without launcher or expman settings, so the script starts a fresh job."""
    drop = ("EXPMAN_", "SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(drop) and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT")}
    return {**env, **extra}


def _run(script: Path, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _stop_shared_collectors(runtime: Path) -> None:
    """The ranks' shared local collector outlives them by design (it exits when idle): stop it now."""
    for pid_file in runtime.glob("expman/job-*/pid"):
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
                 15, "the shared collector to exit")


def test_ddp_every_rank_logs_into_one_run(tmp_path, root, short_dir):
    script = tmp_path / "train_ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    try:
        _run(script, str(root), str(tmp_path / "lightning"), env=_env(XDG_RUNTIME_DIR=str(short_dir)))
        versions = {path.name[-1]: path.read_text() for path in (tmp_path / "lightning").glob("version-*")}
        assert sorted(versions) == ["0", "1"] and versions["0"] == versions["1"]  # both ranks: one run id
        runs = expman.list_runs(root)
        assert len(runs) == 1
        run = runs[0]
        assert run.id == versions["0"] and run.path.parent.name == "lightning" and run.path.name.startswith("ddp-")
        wait_for(lambda: expman.open_run(run.path).status == "finished", 60, "both ranks to finish the run")
        run = expman.open_run(run.path)
        assert run.info["world_size"] == 2 and sorted(run.info["ranks"]) == [0, 1]
        assert [run.info["ranks"][r]["local_rank"] for r in (0, 1)] == [0, 1] and run.info["launcher"] == "lightning"
        assert run.params == {"lr": 0.05, "optimizer": {"name": "sgd", "momentum": 0.0}, "out": "/x/y", "fail_at": -1,
                              "seed": 7, "data": {"batch": 4}}
        assert "param_conflicts" not in run.info  # every rank logged the same hyperparameters
        for rank in (0, 1):  # every rank's own series, not only rank 0's
            mine = run.metrics("rank_id", ranks=[rank])
            assert mine["value"].to_pylist() == [float(rank)] * 5 and mine["step"].to_pylist() == [0, 1, 2, 3, 4]
            assert run.metrics("train_loss", ranks=[rank])["step"].to_pylist() == [0, 1, 2, 3, 4]
        assert not (root / "lightning" / versions["0"]).exists()  # nothing of Lightning's inside the root
    finally:
        _stop_shared_collectors(short_dir)


@pytest.fixture(scope="module")
def single_process_runs(tmp_path_factory) -> dict[str, expman.Run]:
    """One script, four loggers: fit then validate, a fit that raises, a requeue, a Ctrl-C."""
    tmp = tmp_path_factory.mktemp("lightning-single")
    root = tmp / "runs"
    script = tmp / "train_single.py"
    script.write_text(textwrap.dedent(SINGLE_SCRIPT))
    result = _run(script, str(root), str(tmp / "lightning"), env=_env(EXPMAN_SPOOL_DIR=str(tmp / "spool")))
    versions = next(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("VERSIONS"))
    assert len(set(versions)) == 4  # four loggers in one process: four runs
    runs = {run.path.name.split("-")[0]: run for run in expman.list_runs(root, experiment="lightning")}
    assert sorted(runs) == ["bad", "good", "interrupted", "requeued"]
    assert [runs[n].id for n in ("good", "bad", "requeued", "interrupted")] == versions
    return runs


def test_fit_then_validate_lands_in_one_finished_run(single_process_runs):
    run = single_process_runs["good"]
    assert run.status == "finished" and sorted(run.info["ranks"]) == [0]
    assert run.metrics("train_loss")["step"].to_pylist() == [0, 1, 2]
    assert run.metrics("val_loss").num_rows == 1  # logged after fit's finalize: the run was reopened
    assert run.params["optimizer"] == {"name": "sgd", "momentum": 0.0} and run.params["data"] == {"batch": 4}


def test_failed_fit_records_the_exception(single_process_runs):
    run = single_process_runs["bad"]
    assert run.status == "failed"
    error = run.info["error"]
    assert error["type"] == "ValueError" and "loss went to the moon" in error["message"]
    assert run.metrics("train_loss")["step"].to_pylist() == [0, 1]  # what came before the failure is kept


def test_finalize_statuses(single_process_runs):
    assert single_process_runs["requeued"].status == "killed"      # "finished": Slurm requeue, a new run follows
    interrupted = single_process_runs["interrupted"]
    assert interrupted.status == "killed"   # "failed" while handling KeyboardInterrupt
    assert interrupted.info["error"]["type"] == "KeyboardInterrupt"


def test_log_image_as_lightning_loggers_take_it(root):
    """`logger.log_image(key, images, step, caption=[...])`, as in a LightningModule's
    `self.logger.log_image(...)`: pixel-exact images with their captions, one key each."""
    pytest.importorskip("PIL")
    import numpy as np
    import torch

    from expman.integrations.lightning import ExpmanLogger

    logger = ExpmanLogger("lightning", "images", root=root, code_dir=False)
    first = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    second = torch.full((3, 4, 6), 0.5)  # CHW floats in [0, 1], as a model's output
    logger.log_image("samples", [first, second], step=3, caption=["input", "output"])
    logger.log_image("single", [first], step=4)
    with pytest.raises(ValueError, match="2 captions for 1 images"):
        logger.log_image("bad", [first], caption=["a", "b"])
    with pytest.raises(TypeError, match="masks"):
        logger.log_image("bad", [first], masks=[{}])
    run_dir = logger.experiment.run_dir
    logger.finalize("success")
    run = expman.open_run(run_dir)
    wait_for(lambda: run.media().num_rows == 3, 30, "the images to land")
    rows = {r["key"]: r for r in run.media().to_pylist()}
    assert sorted(rows) == ["samples/0", "samples/1", "single"]
    assert (rows["samples/0"]["step"], rows["samples/0"]["caption"]) == (3, "input")
    assert rows["samples/1"]["caption"] == "output" and rows["single"]["step"] == 4
    assert np.array_equal(run.read_media("samples/0", as_="numpy"), first)
    assert np.array_equal(run.read_media("single", as_="numpy"), first)
    assert run.read_media("samples/1", as_="numpy").shape == (4, 6, 3)
