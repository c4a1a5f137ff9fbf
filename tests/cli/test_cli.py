"""The `expman` command, driven the way a user drives it, against runs logged by real collectors."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import expman
from expman._cli.main import main

STEPS = 50


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished runs in "mnist" (the second with an "eval" child run), oldest first."""
    path = tmp_path_factory.mktemp("runs")
    with expman.start_experiment("mnist", "first", root=path) as first:
        first.log_metric("loss", 9.0, step=0)
    with expman.start_experiment("mnist", "train", root=path) as exp:
        exp.log_parameters(
            {"lr": 0.001, "batch_size": 64, "optimizer": {"name": "adamw", "betas": [0.9, 0.999]}, "layers": [784, 10]}
        )
        for step in range(STEPS):
            exp.log_metrics({"loss": 1.0 / (step + 1), "accuracy": step / 100}, step=step)
        exp.log_metric("phase", "cooldown", step=STEPS - 1)
        exp.info("hello from the test")
        with exp.start_experiment("eval") as child:
            child.log_metric("eval/accuracy", 0.75, step=STEPS)
    return path


@pytest.fixture(scope="module")
def ids(mnist_root: Path) -> dict[str, str]:
    return {run.path.name.rsplit("-", 1)[0]: run.id for run in expman.list_runs(mnist_root)}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- ls ---------------------------------------------------------------------------------


def test_ls_lists_runs_newest_first(mnist_root: Path, ids: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "ls", "--root", mnist_root)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["EXPERIMENT", "RUN", "ID", "STATUS", "STARTED", "DURATION", "RANKS"]
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == 3
    by_id = {row[2]: row for row in rows}
    assert set(by_id) == set(ids.values())
    assert by_id[ids["train"]][:4] == ["mnist", f"train-{ids['train']}", ids["train"], "finished"]
    assert by_id[ids["train"]][-2:] == ["1/1", "finished"]
    order = [row[2] for row in rows]
    assert order.index(ids["train"]) < order.index(ids["first"])


def test_ls_filters_by_experiment_and_reads_expman_root(
    mnist_root: Path, ids: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXPMAN_ROOT", str(mnist_root))
    code, out, _ = run_cli(capsys, "ls", "--experiment", "mnist")
    assert code == 0 and ids["eval"] in out
    code, out, _ = run_cli(capsys, "ls", "--experiment", "cifar")
    assert code == 0
    assert "No runs in experiment 'cifar'" in out


def test_ls_on_an_empty_root_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "ls", "--root", tmp_path / "empty")
    assert code == 0 and err == ""
    assert "No runs" in out and "expman demo" in out


def test_ls_on_a_missing_root_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ls", "--root", str(tmp_path / "nope")])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert err.strip() == f"expman: error: --root {tmp_path / 'nope'} is not a folder"
    monkeypatch.setenv("EXPMAN_ROOT", str(tmp_path / "also-nope"))
    with pytest.raises(SystemExit) as exited:
        main(["ls"])
    assert exited.value.code == 2 and "$EXPMAN_ROOT" in capsys.readouterr().err


# --- show -------------------------------------------------------------------------------


def test_show_prints_identity_params_and_last_values(
    mnist_root: Path, ids: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "show", ids["train"], "--root", mnist_root)
    assert code == 0
    fields = dict(re.findall(r"^(\w+) +(.+)$", out, re.MULTILINE))
    assert fields["status"] == "finished"
    assert fields["id"] == ids["train"]
    assert fields["run"] == "mnist/train"
    assert Path(fields["path"]) == (mnist_root / "mnist" / f"train-{ids['train']}").resolve()
    assert fields["children"] == f"eval-{ids['eval']} ({ids['eval']})"
    assert fields["parent"] == "-"
    assert "1 finished" in fields["ranks"]
    assert f"rank 0 on {socket.gethostname()}: finished, last step {STEPS - 1}" in out
    for line in ["lr = 0.001", "batch_size = 64", "optimizer.name = adamw", "optimizer.betas = [0.9, 0.999]",
                 "layers = [784, 10]"]:
        assert f"  {line}\n" in out
    last = {row[0]: row[1:] for row in (line.split() for line in out.split("metrics (last value)")[1].splitlines()[2:])}
    assert last["loss"] == ["0.02", str(STEPS - 1), str(STEPS)]
    assert last["accuracy"] == ["0.49", str(STEPS - 1), str(STEPS)]
    assert last["phase"] == ["cooldown", str(STEPS - 1), "1"]


def test_show_finds_a_run_by_path_and_by_experiment_folder(
    mnist_root: Path, ids: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = f"mnist/eval-{ids['eval']}"
    for run, extra in [(mnist_root / folder, []), (folder, ["--root", mnist_root])]:
        code, out, _ = run_cli(capsys, "show", run, *extra)
        assert code == 0
        assert f"parent    train-{ids['train']} ({ids['train']})" in out
        assert re.search(r"eval/accuracy +0\.75 +50 +1$", out, re.MULTILINE)
        assert "params: none" in out


def test_show_unknown_run_is_one_line_and_exit_1(mnist_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "show", "no-such-run", "--root", mnist_root)
    assert code == 1 and out == ""
    assert "no-such-run" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_show_a_failed_run_with_several_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rank0 = expman.start_experiment("dist", "job", root=tmp_path, rank=0, world_size=2)
    rank1 = expman.start_experiment(
        "dist", "job", root=tmp_path, rank=1, world_size=2, experiment_uid=rank0.uid, collector=rank0._sender.endpoint
    )
    for step in range(3):
        rank0.log_metric("loss", 1.0 + step, step=step)
        rank1.log_metric("loss", 10.0 + step, step=step)
    assert rank1.finish("finished")
    with pytest.raises(ValueError):
        with rank0:
            raise ValueError("boom")
    code, out, _ = run_cli(capsys, "show", rank0.uid, "--root", tmp_path)
    assert code == 0
    assert re.search(r"^status +failed$", out, re.MULTILINE)
    assert re.search(r"^error +ValueError: boom$", out, re.MULTILINE)
    assert "2 of 2 seen (1 failed, 1 finished)" in out
    assert re.search(r"^ +KEY +RANK +LAST +STEP +POINTS$", out, re.MULTILINE)
    assert re.search(r"^ +loss +0 +3 +2 +3$", out, re.MULTILINE)
    assert re.search(r"^ +loss +1 +12 +2 +3$", out, re.MULTILINE)
    # the exception as the rank recorded it in run.yaml: type, message and where it was raised
    traceback = out.split("\ntraceback (from run.yaml)\n", 1)[1]
    assert "Traceback (most recent call last)" in traceback and 'raise ValueError("boom")' in traceback
    assert "ValueError: boom" in traceback


# --- export -----------------------------------------------------------------------------


def test_export_csv_is_readable_by_pyarrow(
    mnist_root: Path, ids: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "metrics.csv"
    code, out, _ = run_cli(capsys, "export", ids["train"], "--format", "csv", "-o", target, "--root", mnist_root)
    assert code == 0
    assert f"wrote {2 * STEPS + 1} rows to {target}" in out
    table = pacsv.read_csv(target)
    assert table.column_names == ["key", "value", "text", "step", "rank", "host", "time"]
    assert table.num_rows == 2 * STEPS + 1
    rows = table.to_pylist()
    assert sorted({r["key"] for r in rows}) == ["accuracy", "loss", "phase"]
    assert [r["text"] for r in rows if r["key"] == "phase"] == ["cooldown"]
    assert str(table.schema.field("time").type) == "timestamp[ns, tz=UTC]"  # ISO 8601 with Z, read back as UTC
    assert abs(rows[0]["time"].timestamp() - time.time()) < 3600


def test_export_keys_and_parquet_round_trip(
    mnist_root: Path, ids: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "loss.parquet"  # the suffix picks the format
    code, out, err = run_cli(capsys, "export", f"mnist/train-{ids['train']}", "-o", target, "--keys", "loss,nope", "--root", mnist_root)
    assert code == 0
    assert f"wrote {STEPS} rows" in out and "(parquet)" in out
    assert "no points for nope" in err
    written = pq.read_table(target)
    expected = expman.open_run(ids["train"], root=mnist_root).metrics("loss")
    assert written.schema == expected.schema
    assert written.to_pylist() == expected.to_pylist()


def test_export_to_an_unwritable_path_is_one_line(
    mnist_root: Path, ids: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "export", ids["train"], "-o", tmp_path / "missing" / "m.csv", "--root", mnist_root)
    assert code == 1
    assert err.startswith("expman: error:") and len(err.strip().splitlines()) == 1


def test_bad_usage_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["export", "some-run", "--format", "xlsx", "-o", "m.xlsx"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'xlsx'" in err and len(err.strip().splitlines()) == 1


def test_export_to_an_unknown_suffix_is_an_error_not_csv(
    mnist_root: Path, ids: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "x.xlsx"
    with pytest.raises(SystemExit) as exited:
        main(["export", ids["train"], "-o", str(target), "--root", str(mnist_root)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and not target.exists()
    assert "x.xlsx" in err and "--format" in err and len(err.strip().splitlines()) == 1
    # named explicitly, any file name goes
    code, out, _ = run_cli(capsys, "export", ids["train"], "-o", target, "-f", "csv", "--root", mnist_root)
    assert code == 0 and pacsv.read_csv(target).num_rows == 2 * STEPS + 1


def test_export_progress_is_quiet_when_piped_and_a_bar_on_a_terminal(
    mnist_root: Path, ids: dict[str, str], tmp_path: Path
) -> None:
    import pty

    command = [sys.executable, "-m", "expman", "export", ids["train"], "--root", str(mnist_root)]
    piped = subprocess.run([*command, "-o", str(tmp_path / "a.csv")], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout.strip() == f"wrote {2 * STEPS + 1} rows to {tmp_path / 'a.csv'} (csv)"
    controller, terminal = pty.openpty()
    try:
        shown = subprocess.run([*command, "-o", str(tmp_path / "b.csv")], stdout=subprocess.PIPE, stderr=terminal,
                               text=True, timeout=120)
        os.close(terminal)
        drawn = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal's other end closed: all read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(controller)
    assert shown.returncode == 0 and shown.stdout == piped.stdout.replace("a.csv", "b.csv")
    assert f"exporting [{'#' * 30}] 100% {2 * STEPS + 1}/{2 * STEPS + 1} rows".encode() in drawn
    assert drawn.endswith(b"\r\x1b[K")  # erased once done


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"expman {expman.__version__}"


# --- demo -------------------------------------------------------------------------------


def test_demo_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "demo", "--root", tmp_path, "--steps", "30")
    assert code == 0
    run = expman.open_run(_printed_run_dir(out))
    assert run.status == "finished"
    assert f"expman show {run.id} --root {tmp_path}" in out
    assert run.metrics("loss").num_rows == 30
    assert run.params["model"]["layers"] == [784, 512, 256, 10]
    assert "epoch 10/10" in run.log_text()
    (child_id,) = run.info["children"]
    assert len(run.id) == len(child_id) == 12  # one id length for parent and child runs
    child = expman.open_run(child_id, root=tmp_path)
    assert child.metrics("eval/accuracy").num_rows == 10


def test_demo_console_script_in_a_fresh_directory(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "expman"
    env = {k: v for k, v in os.environ.items() if k not in ("EXPMAN_ROOT", "EXPMAN_COLLECTOR")}
    done = subprocess.run([script, "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run_dir = _printed_run_dir(done.stdout)
    assert run_dir.is_dir() and run_dir.parent.parent == tmp_path / "experiments"
    run = expman.open_run(run_dir)
    assert run.status == "finished"
    assert run.metrics("loss").num_rows == 2000
    assert f" show {run.id}\n" in done.stdout
    shown = subprocess.run([script, "show", run.id], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^ +loss +\S+ +1999 +2000$", shown.stdout, re.MULTILINE)


def _printed_run_dir(out: str) -> Path:
    match = re.search(r"^ +run dir: +(.+)$", out, re.MULTILINE)
    assert match, out
    return Path(match[1])


def test_demo_prints_commands_that_work_as_printed_without_an_activated_venv(tmp_path: Path) -> None:
    """README's first command runs `.venv/bin/expman demo` without activating the venv: the
    commands it prints must work pasted into that same shell (no venv on PATH)."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "expman").exists():
        pytest.skip("expman is not installed as a console script beside this python")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # a fresh login shell's PATH
    done = subprocess.run([str(bin_dir / "expman"), "demo", "--steps", "40"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    view = done.stdout.split("view it", 1)[1].splitlines()[1:]
    commands = [line.strip() for line in view if line.strip() and not line.strip().startswith("#")]
    assert len(commands) == 3 and any(" show " in c for c in commands) and any(" -c " in c for c in commands)
    for command in commands:
        pasted = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=120)
        assert pasted.returncode == 0, f"{command}\n{pasted.stderr}"
        assert pasted.stdout.strip(), command
    activate = re.search(r"`source (\S+)` first", done.stdout)
    if activate:  # and the other way the hint offers: activate, then the plain names
        shell = f"source {activate[1]} && expman ls && python -c 'import expman, msgpack'"
        activated = subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=120)
        assert activated.returncode == 0, activated.stderr


def test_printed_commands_use_plain_names_only_where_path_finds_this_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from expman._cli import shell

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "expman").exists():
        pytest.skip("expman is not installed as a console script beside this python")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")  # an activated venv
    assert (shell.program("expman"), shell.program("expman-collector"), shell.python()) == (
        "expman", "expman-collector", "python")
    assert shell.activate_hint() is None
    monkeypatch.setenv("PATH", f"/usr/bin{os.pathsep}/bin")  # README's first command: not activated
    monkeypatch.chdir(bin_dir.parent.parent)
    venv = bin_dir.parent.name
    assert shell.program("expman") == f"{venv}/bin/expman" or shell.program("expman").endswith("/bin/expman")
    assert shell.python() != "python" and shell.activate_hint() is not None
