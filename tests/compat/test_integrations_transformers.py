"""`expman.integrations.transformers.ExpmanCallback` driven by a real Hugging Face Trainer on CPU,
with a tiny BERT built from a config (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

import expman

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers is not installed (pip install 'expman[transformers]')")

SCRIPT = """
import sys, torch, expman
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments
from expman.integrations.transformers import ExpmanCallback

root, out = sys.argv[1], sys.argv[2]


def trainer(callback, *extra, run_name="tiny-bert", max_steps=4):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    data = [{"input_ids": torch.randint(0, 32, (8,)), "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 2}
            for i in range(16)]
    args = TrainingArguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=4, logging_steps=1,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             run_name=run_name, seed=3)
    return Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=data, eval_dataset=data[:8],
                   callbacks=[callback, *extra])


class Boom(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("boom after step 2")


good = ExpmanCallback("hf", root=root)
t = trainer(good)
t.train()
print("AFTER-TRAIN", expman.open_run(good.experiment.run_dir).status, flush=True)
t.evaluate()   # after on_train_end: the run is reopened for the eval points
t.predict(t.eval_dataset)
bad = ExpmanCallback("hf", "crashed", root=root, log_model_config=False)
try:
    trainer(bad, Boom()).train()
except RuntimeError:
    print("CAUGHT", flush=True)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[str, dict[str, expman.Run]]:
    tmp = tmp_path_factory.mktemp("transformers")
    root = tmp / "runs"
    script = tmp / "train_hf.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPMAN_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf-home"),
               EXPMAN_SPOOL_DIR=str(tmp / "spool"))
    result = subprocess.run([sys.executable, str(script), str(root), str(tmp / "out")], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    found = {run.path.name.rsplit("-", 1)[0]: run for run in expman.list_runs(root, experiment="hf")}
    assert sorted(found) == ["crashed", "tiny-bert"]  # the run name defaults to args.run_name
    return result.stdout, found


def test_trainer_logs_args_config_and_points_at_global_step(runs):
    stdout, found = runs
    run = found["tiny-bert"]
    assert "AFTER-TRAIN finished" in stdout  # on_train_end finished the run
    assert run.status == "finished"
    params = run.params
    assert params["learning_rate"] == 1e-3 and params["max_steps"] == 4 and params["report_to"] == []
    assert params["run_name"] == "tiny-bert" and params["seed"] == 3
    assert params["model_config"]["hidden_size"] == 16 and params["model_config"]["id2label"] == {"0": "LABEL_0",
                                                                                                  "1": "LABEL_1"}
    assert run.metrics("loss")["step"].to_pylist() == [1, 2, 3, 4]
    assert run.metrics("learning_rate")["value"].to_pylist()[0] == pytest.approx(1e-3)
    assert run.metrics("train_runtime")["step"].to_pylist() == [4]
    assert run.metrics("eval_loss")["step"].to_pylist() == [4]  # trainer.evaluate() after training
    assert run.metrics("test_loss")["step"].to_pylist() == [4]  # trainer.predict()


def test_training_that_raises_ends_failed(runs):
    stdout, found = runs
    assert "CAUGHT" in stdout
    run = found["crashed"]
    assert run.status == "failed"
    assert run.info["error"]["type"] == "TrainingNotFinished"
    assert run.metrics("loss")["step"].to_pylist() == [1, 2]  # the points before the exception are kept
    assert "model_config" not in run.params and run.params["max_steps"] == 4
