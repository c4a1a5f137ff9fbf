"""Docs are code: the code blocks of README.md and docs/*.md run, and README's "API at a
glance" matches the real signatures, so the docs cannot drift from the code.

Each file's python blocks run in order in one namespace, in a fresh folder with
EXPMAN_ROOT=./experiments, after README's first example (the docs assume you ran it:
experiment "mnist", run "baseline"). Bash lines that run one of our commands run too,
through the installed console scripts. What cannot run here is listed in SKIP with why.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import expman
from expman._rank.experiment import Experiment
from expman._reader.run import Run

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
OUR_COMMANDS = ("expman", "expman-tui", "expman-collector")

# Blocks that do not run here, by file and the block's first line (a prefix is enough).
SKIP = {
    # installs into a new venv and runs the whole suite: what CI does, minutes of work
    ("README.md", "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/expman demo"): "install",
    ("README.md", "python3 -m venv .venv && .venv/bin/pip install torch"): "install",
    # the TUI is interactive and --serve a server: tests/test_tui_*.py drive them
    ("README.md", "expman-tui [ROOT]"): "interactive",
    # a signature listing with placeholders: test_api_at_a_glance_matches_the_signatures checks it
    ("README.md", "exp = expman.start_experiment(space=None"): "signature listing",
    # object storage: tests/test_objstore.py runs these against a real S3-protocol server
    ("analysis.md", 'import expman\n\nROOT = "s3://bucket/prefix"'): "object storage",
    ("analysis.md", "import pyarrow.fs"): "object storage",
    ("analysis.md", "import polars as pl\n\nimport expman\n\nROOT = \"s3://"): "object storage",
    ("analysis.md", "import duckdb\nimport pyarrow as pa"): "object storage",
    # need a model and data of the reader's own: tests/test_integrations_*.py train real ones
    ("integrations.md", "import lightning as L"): "needs a model",
    ("integrations.md", "from transformers import Trainer"): "needs a model",
    # a synopsis with placeholders (RUN, [--experiment E]); tests/test_tensorboard.py runs both commands
    ("integrations.md", "expman export RUN --format tensorboard"): "synopsis",
}


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block."""
    text = path.read_text()
    return [(m[1], m[2], text.count("\n", 0, m.start()) + 1) for m in BLOCK.finditer(text)]


def skipped(path: Path, code: str) -> str | None:
    return next((why for (name, first), why in SKIP.items() if path.name == name and code.startswith(first)), None)


@pytest.fixture
def docs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh folder with README's first example run in it (experiments/mnist/baseline-*)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EXPMAN_ROOT", str(tmp_path / "experiments"))
    monkeypatch.delenv("EXPMAN_COLLECTOR", raising=False)
    _, first, _ = blocks(REPO / "README.md")[0]
    run_python(first, {}, REPO / "README.md")
    return tmp_path


def run_python(code: str, scope: dict, path: Path) -> None:
    from expman._rank.start import shutdown

    try:
        exec(compile(code, str(path), "exec"), scope)
    finally:
        shutdown()  # runs finished and their collector gone before the next block reads


def run_bash(code: str, cwd: Path) -> list[str]:
    """Run each line that is one of our commands; return the lines run."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran = []
    for line in code.splitlines():
        command = line.split(" #", 1)[0].strip()
        if not command or shlex.split(command)[0] not in OUR_COMMANDS:
            continue
        done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
        ran.append(command)
    return ran


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_code_blocks_run(path: Path, docs_root: Path) -> None:
    scope: dict = {}
    ran = 0
    for language, code, line in blocks(path):
        if skipped(path, code) or language not in ("python", "bash"):
            continue
        try:
            if language == "python":
                run_python(code, scope, path)
                ran += 1
            else:
                ran += len(run_bash(code, docs_root))
        except BaseException as exc:
            raise AssertionError(f"{path.name}, the {language} block at line {line} failed: {exc!r}") from exc
    if path.name == "README.md":
        assert ran >= 3  # the quick start again, the distributed example, the CLI lines
        assert scope["run"].status == "finished"


def test_every_skip_names_a_block_that_exists() -> None:
    """A skip whose block was edited away would hide nothing; keep the list honest."""
    present = {(path.name, code) for path in DOCS for _, code, _ in blocks(path)}
    for name, first in SKIP:
        assert any(n == name and code.startswith(first) for n, code in present), (name, first)


# --- README's "API at a glance" ------------------------------------------------------------


def api_block() -> str:
    section = (REPO / "README.md").read_text().split("## API at a glance\n", 1)[1]
    return BLOCK.search(section)[2]


def listed_signature() -> inspect.Signature:
    """The start_experiment(...) of the listing, read as the def it shows."""
    code = api_block()
    start = code.index("expman.start_experiment(")
    depth, end = 0, start
    for end in range(code.index("(", start), len(code)):
        depth += {"(": 1, ")": -1}.get(code[end], 0)
        if depth == 0:
            break
    args = re.sub(r"#[^\n]*", "", code[code.index("(", start) + 1:end])
    namespace: dict = {}
    exec(f"def start_experiment({args}): pass", namespace)
    return inspect.signature(namespace["start_experiment"])


def test_api_at_a_glance_lists_every_start_experiment_argument_with_its_default() -> None:
    real = inspect.signature(expman.start_experiment)
    real = real.replace(parameters=[p for p in real.parameters.values() if not p.name.startswith("_")])
    listed = listed_signature()
    assert list(listed.parameters) == list(real.parameters), "the same arguments in the same order"
    for name, param in real.parameters.items():
        shown = listed.parameters[name]
        assert (shown.kind, shown.default) == (param.kind, param.default), name


def _target(node: ast.expr) -> object | None:
    """What a call in the listing calls: a method of Experiment or Run, or expman.X."""
    if not isinstance(node, ast.Attribute):
        return None
    owner = node.value
    if isinstance(owner, ast.Name) and owner.id in ("exp", "child"):
        return getattr(Experiment, node.attr)
    if isinstance(owner, ast.Name) and owner.id == "run":
        return getattr(Run, node.attr)
    if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Attribute) and owner.func.attr == "open_run":
        return getattr(Run, node.attr)
    if isinstance(owner, ast.Name) and owner.id == "expman":
        return getattr(expman, node.attr)
    return None


def test_api_at_a_glance_calls_bind_to_the_real_signatures() -> None:
    code = api_block()
    rest = code[code.index("\nexp.log_metric("):]
    calls = [node for node in ast.walk(ast.parse(rest)) if isinstance(node, ast.Call)]
    checked = 0
    for call in calls:
        target = _target(call.func)
        if target is None:
            continue
        signature = inspect.signature(target)
        positional = [None] * len(call.args)
        if isinstance(target, type(Experiment.log_metric)) and "." in target.__qualname__:
            positional = [None, *positional]  # self
        signature.bind(*positional, **{k.arg: None for k in call.keywords if k.arg})  # raises TypeError if wrong
        checked += 1
    assert checked >= 20


def test_api_at_a_glance_names_every_stats_counter(tmp_path: Path) -> None:
    listed = re.search(r"exp\.stats\(\) +# \{(.*?)\}", api_block())[1]
    with expman.start_experiment("docs", "stats", root=tmp_path) as exp:
        real = exp.stats()
    assert [name.strip(" '") for name in listed.split(",")] == list(real)
