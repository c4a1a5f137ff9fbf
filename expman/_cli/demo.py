"""`expman demo`: a simulated training run, so a new user sees a real run directory in seconds.

It uses only the public API, the way a training script would: parameters, a metric per
step, a few log lines, and a child run for evaluation. No collector needs to be set up:
with none configured, `start_experiment` starts a private one (local mode). The commands
it prints to look at the run must work pasted into the shell that ran it: `own_commands`.
"""

from __future__ import annotations

import math
import os
import random
import shlex
import shutil
import sys
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


def own_commands(prog: str = "expman") -> tuple[str, str, str | None]:
    """How to run this installation's `expman` and `python` from the user's shell: the plain
    names when PATH finds these, else their paths (and the activate script to source, if any).

    `.venv/bin/expman demo` runs with the venv never activated: plain `expman` is then
    not found, or is another installation's, and plain `python` lacks our dependencies."""
    bin_dir = Path(sys.executable).parent
    here = bin_dir / prog
    found = shutil.which(prog)
    on_path = found is not None and here.exists() and Path(found).resolve() == here.resolve()
    python_found = shutil.which("python")
    python_ok = python_found is not None and Path(python_found).parent.resolve() == bin_dir.resolve()
    if on_path and python_ok:
        return prog, "python", None

    def short(path: Path) -> str:
        try:
            relative = path.relative_to(Path.cwd())
        except ValueError:
            return shlex.quote(str(path))
        return shlex.quote(str(relative) if str(relative).startswith(".") else f"./{relative}")

    expman_cmd = short(here) if here.exists() else f"{short(Path(sys.executable))} -m {prog}"
    activate = bin_dir / "activate"
    return expman_cmd, short(Path(sys.executable)), short(activate) if activate.exists() else None
