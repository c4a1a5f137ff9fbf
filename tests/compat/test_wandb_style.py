"""The W&B-style module API: `import expman as wandb` runs the W&B quickstart unchanged."""

from __future__ import annotations

import argparse

import pytest

import expman

QUICKSTART = '''
import expman as wandb
import random

wandb.login()

epochs = 10
lr = 0.01

run = wandb.init(
    # Set the project where this run will be logged
    project="my-awesome-project",
    # Track hyperparameters and run metadata
    config={
        "learning_rate": lr,
        "epochs": epochs,
    },
)

offset = random.random() / 5
print(f"lr: {lr}")

# simulating a training run
for epoch in range(2, epochs):
    acc = 1 - 2**-epoch - random.random() / epoch - offset
    loss = 2**-epoch + random.random() / epoch + offset
    print(f"epoch={epoch}, accuracy={acc}, loss={loss}")
    run.log({"accuracy": acc, "loss": loss})

run.finish()

# the older quickstart: module-level calls, wandb.config set after init
wandb.init(project="my-awesome-project", config={"learning_rate": 0.02, "architecture": "CNN"})
wandb.config.dropout = 0.2
wandb.config.update({"batch_size": 64})
for epoch in range(2, epochs):
    wandb.log({"acc": 1 - 2**-epoch, "loss": 2**-epoch})
wandb.finish()
print("RUN-DIR", run.dir)
'''


def test_wandb_quickstart_runs_unchanged(run_script, root):
    result = run_script(QUICKSTART, env={"EXPMAN_ROOT": str(root)}, check=True)
    runs = expman.list_runs(root, experiment="my-awesome-project")
    assert len(runs) == 2
    first = expman.open_run(result.stdout.split("RUN-DIR ")[1].strip())
    second = next(r for r in runs if r.path != first.path)
    assert first.status == second.status == "finished"
    assert first.params == {"learning_rate": 0.01, "epochs": 10}
    loss = first.metrics(keys="loss")
    assert loss["step"].to_pylist() == list(range(8))  # W&B's internal step: 0, 1, 2, ...
    assert second.params == {"learning_rate": 0.02, "architecture": "CNN", "dropout": 0.2, "batch_size": 64}
    assert second.metrics(keys="acc").num_rows == 8


def test_log_step_semantics_and_config(root):
    assert expman.run is None
    with pytest.raises(expman.ExpmanError, match="init"):
        expman.log({"x": 1})
    with pytest.raises(expman.ExpmanError, match="init"):
        expman.config.lr = 0.1
    run = expman.init(project="p", name="steps", config=argparse.Namespace(lr=0.1, layers=[4, 4]), root=root,
                      tags=["t"], group="g", notes="first try")
    assert expman.run is run and run.exp is run.exp and isinstance(run.exp, expman.Experiment)
    assert expman.config.lr == 0.1 and expman.config["layers"] == [4, 4] and "lr" in expman.config
    expman.config["seed"] = 3
    expman.config.setdefaults({"seed": 4, "wd": 0.0})
    with pytest.raises(TypeError):
        expman.config.bad = object()  # nothing kept from a value that cannot be stored
    assert "bad" not in expman.config
    expman.log({"a": 1})                          # step 0
    expman.log({"a": 2}, commit=False)            # step 1, stays
    expman.log({"b": 3})                          # step 1, moves on
    expman.log({"a": 4}, step=10)                 # step 10, stays
    expman.log({"b": 5})                          # step 10, moves on
    expman.log({"train": {"loss": 0.5}})          # step 11, nested -> train/loss
    expman.log({"a": 6}, step=3)                  # below the current step: kept (W&B drops it)
    assert run.step == 12
    run.log_metric("raw", 1.0, step=99)           # the Experiment's own verbs go through
    expman.finish(exit_code=1)
    assert expman.run is None
    done = expman.open_run(run.dir)
    assert done.status == "failed"
    assert done.params == {"lr": 0.1, "layers": [4, 4], "seed": 3, "wd": 0.0}
    assert set(done.info["tags"]) == {"t", "group:g"}
    assert "first try" in done.log_text()
    table = done.metrics()
    got = sorted((str(k), s, v) for k, s, v in zip(table["key"].to_pylist(), table["step"].to_pylist(),
                                                  table["value"].to_pylist()))
    assert got == sorted([("a", 0, 1.0), ("a", 1, 2.0), ("b", 1, 3.0), ("a", 10, 4.0), ("b", 10, 5.0),
                          ("train/loss", 11, 0.5), ("a", 3, 6.0), ("raw", 99, 1.0)])


def test_init_finishes_the_previous_run_and_context_manager(root):
    first = expman.init(project="p", name="one", root=root)
    with expman.init(project="p", name="two", root=root) as second:
        assert expman.run is second
        assert first.exp.status == "finished"
        second.log({"x": 1.0})
    assert expman.run is None
    assert expman.open_run(second.dir).status == "finished"
    with pytest.raises(ValueError, match="disabled"):
        expman.init(project="p", mode="disabled", root=root)
