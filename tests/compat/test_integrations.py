"""What the framework adapters share, tested without the frameworks: parameters, run ids,
and the errors when a framework is missing."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from expman._rank.launcher import detect_launch
from expman.integrations._params import to_params
from expman.integrations._run_ids import JOB_ENV, job_seed


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Optim:
    name: str = "adam"
    betas: tuple = (0.9, 0.999)


def test_hyperparameter_objects_become_nested_parameters():
    params = argparse.Namespace(
        lr=1e-3, data=argparse.Namespace(path=Path("/data/x"), sizes={3, 1}), optim=Optim(), color=Color.RED,
        weights=np.array([1.0, 2.0]), scale=np.float32(0.5), big=np.zeros((40, 40)), act=os.path.join, cls=Optim,
        other=object(), keys={1: "one"}, nothing=None,
    )
    out = to_params(params)
    assert out["lr"] == 1e-3 and out["nothing"] is None
    assert out["data"] == {"path": "/data/x", "sizes": [1, 3]}
    assert out["optim"] == {"name": "adam", "betas": [0.9, 0.999]}
    assert out["color"] == "red" and out["weights"] == [1.0, 2.0] and out["scale"] == 0.5
    assert out["big"] == "ndarray(shape=[40, 40], dtype=float64)"
    assert out["act"] == "posixpath.join" and out["cls"].endswith("test_integrations.Optim")
    assert out["other"].startswith("<object object") and out["keys"] == {"1": "one"}
    with pytest.raises(TypeError, match="dict or an argparse.Namespace"):
        to_params([1, 2])


SEEDS = """
import json, os, subprocess, sys
from expman.integrations._run_ids import adapter_run_id
ids = [adapter_run_id(), adapter_run_id(), adapter_run_id("mine")]
if len(sys.argv) > 1:  # the parent: start a child as Lightning's launcher does, and one plain subprocess
    for local_rank in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
        if local_rank:
            env["LOCAL_RANK"] = local_rank
        ids.append(json.loads(subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                                              check=True).stdout))
print(json.dumps(ids))
"""


def test_ranks_started_by_lightning_share_run_ids(tmp_path):
    script = tmp_path / "ids.py"
    script.write_text(textwrap.dedent(SEEDS))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXPMAN_", "SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    first, second, mine, lightning_child, plain_child = json.loads(
        subprocess.run([sys.executable, str(script), "parent"], env=env, capture_output=True, text=True, check=True).stdout)
    assert first != second and mine == "mine"  # two adapters in one process: two runs
    assert lightning_child == [first, second, "mine"]  # the rank Lightning started derives the same ids
    assert plain_child[0] not in (first, second)  # any other subprocess starts a job of its own
    again = json.loads(subprocess.run([sys.executable, str(script)], env={**env, "EXPMAN_RUN_ID": "fixed"},
                                                    capture_output=True, text=True, check=True).stdout)
    assert again == ["fixed", "fixed", "mine"]


def test_job_seed_follows_launchers():
    torchrun = {"TORCHELASTIC_RUN_ID": "abc", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    assert job_seed(torchrun, 1) == job_seed({**torchrun, "RANK": "0", "LOCAL_RANK": "0"}, 2)  # from the job id
    inherited = {JOB_ENV: "42:seed", "LOCAL_RANK": "1"}
    assert job_seed(inherited, 42) == "seed"
    assert job_seed(inherited, 43) != "seed"  # not our parent's: a stale value from further up
    assert job_seed({**inherited, "LOCAL_RANK": "0"}, 42) != "seed"  # rank 0 itself never inherits


def test_lightning_launcher_is_detected_on_one_node():
    child = {"LOCAL_RANK": "1", "WORLD_SIZE": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    launch = detect_launch(child)
    assert (launch.launcher, launch.rank, launch.local_rank, launch.world_size) == ("lightning", 1, 1, 2)
    rank0 = detect_launch({**child, "LOCAL_RANK": "0"})
    assert rank0.rank == 0 and rank0.job != launch.job  # rank 0 is the job: its children name their parent
    assert f":{os.getpid()}:" in rank0.job and f":{os.getppid()}:" in launch.job
    assert detect_launch({**child, "NODE_RANK": "1"}).launcher == "none"  # other nodes: no common ancestor


@pytest.mark.parametrize("module,framework,extra", [
    ("expman.integrations.lightning", "lightning", "expman[lightning]"),
    ("expman.integrations.transformers", "transformers", "expman[transformers]"),
])
def test_missing_framework_names_the_extra(module, framework, extra):
    code = f"import sys; sys.modules[{framework!r}] = None\ntry:\n    import {module}\nexcept ImportError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"pip install '{extra}'" in out


def test_integrations_import_nothing_heavy():
    code = ("import sys, expman, expman.integrations, expman.integrations._params, expman.integrations._run_ids; "
            "print(sorted(m for m in ('torch', 'lightning', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
