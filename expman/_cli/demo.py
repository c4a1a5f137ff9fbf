"""`expman demo`: a simulated training run, so a new user sees a real run directory in seconds.

It uses only the public API, the way a training script would: parameters, a metric per
step, a few log lines, and a child run for evaluation. No collector needs to be set up:
with none configured, `start_experiment` starts a private one (local mode). The commands
it prints to look at the run work pasted into the shell that ran it (expman/_cli/shell.py).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from expman._rank.start import start_experiment
from expman._rank.experiment import Experiment
from expman._reader.run import open_run

DEMO_EXPERIMENT = "demo"
DEFAULT_STEPS = 2000
EPOCHS = 10
WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class DemoResult:
    """Where the demo run landed, read back from disk after it finished."""

    run_dir: Path
    uid: str
    status: str
    points: int
    child_dir: Path


def run_demo(root: str | os.PathLike[str] | None = None, steps: int = DEFAULT_STEPS, seed: int = 0) -> DemoResult:
    """Log a fake training run of `steps` steps (plus an "eval" child run) and read it back."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    rng = random.Random(seed)
    with start_experiment(DEMO_EXPERIMENT, "train", root=root, tags=["demo"]) as exp:
        exp.log_parameters(
            {
                "lr": 3e-3,
                "batch_size": 128,
                "epochs": EPOCHS,
                "steps": steps,
                "seed": seed,
                "optimizer": {"name": "adamw", "betas": [0.9, 0.999], "weight_decay": 0.01},
                "model": {"layers": [784, 512, 256, 10], "activation": "relu", "dropout": 0.1},
            }
        )
        exp.info(f"starting training: {steps} steps, {EPOCHS} epochs, batch size 128")
        with exp.start_experiment("eval", tags=["demo"]) as evaluation:
            _train(exp, evaluation, steps, rng)
        exp.info("training done")
    run = open_run(exp.run_dir)
    return DemoResult(
        run_dir=run.path,
        uid=run.id,
        status=run.status,
        points=run.metrics().num_rows,
        child_dir=evaluation.run_dir,
    )


def _train(exp: Experiment, evaluation: Experiment, steps: int, rng: random.Random) -> None:
    peak_lr = 3e-3
    warmup = max(1, int(steps * WARMUP_FRACTION))
    epoch_ends = {max(1, steps * e // EPOCHS) - 1: e for e in range(1, EPOCHS + 1)}
    exp.log_metric("phase", "warmup", step=0)
    for step in range(steps):
        t = step / steps
        if step < warmup:
            lr = peak_lr * (step + 1) / warmup
        else:
            lr = 0.5 * peak_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        noise = rng.gauss(0.0, 1.0)
        loss = 2.3 * math.exp(-4.0 * t) + 0.08 + abs(noise) * (0.15 * math.exp(-2.0 * t) + 0.02)
        accuracy = min(1.0, max(0.0, 0.97 - 0.87 * math.exp(-5.0 * t) + 0.01 * noise))
        exp.log_metrics({"loss": loss, "accuracy": accuracy, "lr": lr}, step=step)
        if step + 1 == warmup:
            exp.log_metric("phase", "train", step=step)
        epoch = epoch_ends.get(step)
        if epoch is not None:
            eval_loss = loss * (1.05 + 0.05 * rng.random())
            eval_accuracy = max(0.0, accuracy - 0.01 - 0.01 * rng.random())
            evaluation.log_metrics({"eval/loss": eval_loss, "eval/accuracy": eval_accuracy}, step=step)
            exp.info(f"epoch {epoch}/{EPOCHS}: loss {loss:.4f}, accuracy {accuracy:.3f}, eval accuracy {eval_accuracy:.3f}")
    exp.log_metric("phase", "done", step=steps - 1)

