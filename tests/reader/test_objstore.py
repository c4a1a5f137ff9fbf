"""Readers on object storage: runs logged by a real collector, copied to a real S3-protocol
server (moto, on loopback), read back through s3:// URIs, a filesystem= and the CLI, and
compared with reading the same runs from the local disk."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs
import pytest

import expman
from _helpers import wait_for
from expman._cli.main import main
from expman._storage.crypto import create_key_file
from expman._wire.frames import ARTIFACT_CHUNK_BYTES

BUCKET = "runs"


def key_file(root: Path) -> Path:
    return root.parent / "master.key"


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Experiment "mnist": two finished runs of two ranks each; lr0.1 also has a log line,
    a text point, an artifact and hardware samples, lr0.01 an encrypted artifact of three
    chunks."""
    from expman._rank import start as _api

    root = tmp_path_factory.mktemp("objstore")
    checkpoint = root.parent / "weights.bin"
    checkpoint.write_bytes(os.urandom(3000))
    secret = root.parent / "secret.bin"
    secret.write_bytes(os.urandom(2 * ARTIFACT_CHUNK_BYTES + 9))
    create_key_file(key_file(root))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EXPMAN_KEY_FILE", str(key_file(root)))  # for the local collector this starts
        _log_runs(root, checkpoint, secret)
        _api.shutdown()
    return root


def _log_runs(root: Path, checkpoint: Path, secret: Path) -> None:
    from expman._rank import start as _api

    endpoint = _api._local_collector(root, None).endpoint
    for lr, run_id in ((0.1, "lr01"), (0.01, "lr001")):
        extra = {"log_hardware": True, "hardware_interval": 0.05} if run_id == "lr01" else {"encrypt_artifacts": True}
        exps = [expman.start_experiment("mnist", f"lr{lr}", root=root, rank=r, world_size=2, run_id=run_id,
                                        collector=endpoint, code_dir=False, **extra) for r in (0, 1)]
        exps[0].log_parameters({"lr": lr, "optimizer": {"name": "adamw"}})
        for step in range(10):
            for rank, exp in enumerate(exps):
                exp.log_metrics({"loss": (1 + rank) / (step + 1), "accuracy": lr * step + rank / 100}, step=step)
        if run_id == "lr01":
            exps[0].log_metric("phase", "cooldown", step=9)
            exps[1].info("rank 1 says hello")
            exps[0].log_artifact(checkpoint, name="ckpt/weights.bin")
            wait_for(lambda: _hardware_rows(root, run_id) > 0, 10, "hardware samples")
        else:
            exps[0].log_artifact(secret, name="secret.bin")
        for exp in exps:
            assert exp.finish()
    for run_id in ("lr01", "lr001"):
        wait_for(lambda: expman.open_run(run_id, root=root).status == "finished", 10, "the runs to finish")


def _hardware_rows(root: Path, run_id: str) -> int:
    try:
        return expman.open_run(run_id, root=root).hardware().num_rows
    except expman.RunNotFoundError:  # the collector has not created the run folder yet
        return 0


@pytest.fixture(scope="module")
def s3_root(s3_server, mnist_root: Path) -> str:
    """The same root uploaded to s3://runs/team (as `aws s3 sync` would)."""
    fs = s3_server.filesystem()
    fs.create_dir(BUCKET)
    pafs.copy_files(str(mnist_root), f"{BUCKET}/team", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return f"s3://{BUCKET}/team"


def assert_same_run(remote: expman.Run, local: expman.Run, tmp_path: Path) -> None:
    """Everything the reader offers reads the same from object storage as from disk."""
    assert remote.info == local.info and remote.id == local.id and remote.status == "finished"
    assert remote.params == local.params
    assert remote.metrics().to_pylist() == local.metrics().to_pylist()
    assert remote.metrics("loss", ranks=[1]).to_pylist() == local.metrics("loss", ranks=[1]).to_pylist()
    assert remote.metrics(reduce="mean").to_pylist() == local.metrics(reduce="mean").to_pylist()
    assert remote.rank_stats().to_pylist() == local.rank_stats().to_pylist()
    assert remote.hardware().to_pylist() == local.hardware().to_pylist()
    assert remote.log_text() == local.log_text()
    assert remote.artifacts() == local.artifacts()
    key = key_file(local.path.parent.parent)
    for record in local.artifacts():
        content = local.read_artifact(record.name, key_file=key)
        assert remote.read_artifact(record.name, key_file=key) == content
        fetched = remote.download_artifact(record.name, tmp_path / "fetched" / record.name.replace("/", "_"), key_file=key)
        assert fetched.read_bytes() == content


def test_list_runs_and_open_run_read_an_s3_root_as_they_read_the_disk(s3_root, mnist_root, tmp_path):
    local_runs = expman.list_runs(mnist_root)
    remote_runs = expman.list_runs(s3_root)
    assert [r.id for r in remote_runs] == [r.id for r in local_runs] == ["lr001", "lr01"]  # newest first
    for remote, local in zip(remote_runs, local_runs):
        assert remote.location == f"{s3_root}/mnist/{local.path.name}"
        assert remote.path == PurePosixPath(f"{BUCKET}/team/mnist/{local.path.name}")
        assert_same_run(remote, local, tmp_path)
    lr01 = expman.open_run("lr01", root=mnist_root)
    assert lr01.hardware().num_rows > 0 and lr01.artifacts() and "rank 1 says hello" in lr01.log_text()
    (secret,) = expman.open_run("lr001", root=mnist_root).artifacts()
    assert secret.encrypted and secret.size == 2 * ARTIFACT_CHUNK_BYTES + 9
    assert expman.list_runs(s3_root, experiment="mnist")[1].id == "lr01"
    assert expman.list_runs(s3_root, experiment="cifar") == []
    assert expman.list_runs(f"s3://{BUCKET}/nothing-here") == []


def test_open_run_by_uri_by_folder_and_by_id_under_an_s3_root(s3_root, mnist_root, monkeypatch):
    folder = expman.open_run("lr01", root=mnist_root).path.name
    by_uri = expman.open_run(f"{s3_root}/mnist/{folder}")
    by_folder = expman.open_run(f"mnist/{folder}", root=s3_root)
    by_id = expman.open_run("lr01", root=s3_root)
    assert by_uri.location == by_folder.location == by_id.location == f"{s3_root}/mnist/{folder}"
    assert expman.Run(f"{s3_root}/mnist/{folder}").params == {"lr": 0.1, "optimizer": {"name": "adamw"}}
    monkeypatch.setenv("EXPMAN_ROOT", s3_root)  # readers take the root from the environment too
    assert expman.open_run("lr001").status == "finished"
    assert [r.id for r in expman.list_runs()] == ["lr001", "lr01"]


def test_uri_query_parameters_carry_the_endpoint(s3_server, s3_root, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the URI says where the server is
    uri = f"{s3_root}?endpoint_override={s3_server.endpoint}&scheme=http&region=us-east-1"
    runs = expman.list_runs(uri)
    assert [r.id for r in runs] == ["lr001", "lr01"]
    assert runs[1].location.startswith(f"{s3_root}/mnist/lr0.1-") and "endpoint" not in runs[1].location
    assert runs[1].metrics("loss").num_rows == 20
    with_keys = f"s3://test:test@{BUCKET}/team?endpoint_override={s3_server.endpoint}&scheme=http"
    assert expman.open_run("lr01", root=with_keys).location == runs[1].location  # no keys in what is shown


def test_filesystem_argument_reads_with_its_own_credentials_and_endpoint(s3_server, s3_root, mnist_root, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    fs = pafs.S3FileSystem(endpoint_override=s3_server.endpoint, scheme="http", access_key="someone",
                           secret_key="their-secret", region="us-east-1")
    runs = expman.list_runs(f"{BUCKET}/team", filesystem=fs)
    assert [r.id for r in runs] == ["lr001", "lr01"]
    assert runs[0].location == f"s3://{BUCKET}/team/mnist/{runs[0].path.name}"
    run = expman.open_run("lr01", root=f"{BUCKET}/team", filesystem=fs)
    assert run.metrics().to_pylist() == expman.open_run("lr01", root=mnist_root).metrics().to_pylist()
    assert expman.open_run(run.location, filesystem=fs).id == "lr01"  # its URI form is fine too
    assert expman.Run(run.path, filesystem=fs).id == "lr01"
    local = expman.open_run("lr01", root=mnist_root, filesystem=pafs.LocalFileSystem())
    assert isinstance(local.path, Path) and local.path == expman.open_run("lr01", root=mnist_root).path


def test_a_live_run_copied_with_its_write_ahead_log_reads_the_same(s3_server, s3_root, collector, tmp_path):
    """A run synced while live (here: its collector frozen between flushes) still has
    points only in .wal/; the reader replays them from object storage as from disk."""
    exp = expman.start_experiment("live", "synced", root=collector.root, collector=collector.endpoint, code_dir=False)
    local = wait_for(lambda: (Path(exp.run_dir) / "run.yaml").exists() and expman.Run(exp.run_dir), 10, "the run")
    wal = Path(exp.run_dir) / ".wal"
    logged = 0
    for _attempt in range(20):  # stop the collector at a moment when its WAL holds points
        for _ in range(100):
            exp.log_metric("loss", 1.0 / (logged + 1), step=logged)
            logged += 1
        wait_for(lambda: exp.stats()["acked"] == logged, 10, "acks")
        os.kill(collector.proc.pid, signal.SIGSTOP)
        if any(p.stat().st_size for p in wal.glob("*/*.wal")):
            break
        os.kill(collector.proc.pid, signal.SIGCONT)
    else:
        pytest.fail("the collector flushed every time; no write-ahead segment to copy")
    fs = s3_server.filesystem()
    try:
        pafs.copy_files(str(collector.root), f"{BUCKET}/live-copy", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        remote = expman.open_run(f"s3://{BUCKET}/live-copy/live/{local.path.name}")
        assert remote.status == "running"
        assert any(p.endswith(".wal") for p in _keys(fs, f"{BUCKET}/live-copy"))
        steps = remote.metrics()["step"].to_pylist()
        assert sorted(steps) == list(range(logged)), "every acknowledged point, parts and WAL together"
        assert remote.metrics().to_pylist() == local.metrics().to_pylist()
        assert remote.rank_stats().to_pylist() == local.rank_stats().to_pylist()
    finally:
        os.kill(collector.proc.pid, signal.SIGCONT)
        finished = exp.finish(timeout=10)
    assert finished


def _keys(fs: pafs.FileSystem, prefix: str) -> list[str]:
    return [info.path for info in fs.get_file_info(pafs.FileSelector(prefix, recursive=True))]


def test_cli_ls_show_and_export_take_an_s3_root_or_run(s3_root, mnist_root, tmp_path, capsys):
    assert main(["ls", "--root", s3_root]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(row[0], row[2], row[3]) for row in rows] == [("mnist", "lr001", "finished"), ("mnist", "lr01", "finished")]

    assert main(["show", "lr01", "--root", s3_root]) == 0
    out = capsys.readouterr().out
    folder = expman.open_run("lr01", root=mnist_root).path.name
    assert f"path      {s3_root}/mnist/{folder}" in out
    assert "lr = 0.1" in out and "optimizer.name = adamw" in out
    assert "phase" in out and "cooldown" in out

    target = tmp_path / "m.parquet"
    assert main(["export", f"{s3_root}/mnist/{folder}", "-o", str(target), "--keys", "loss"]) == 0
    assert "wrote 20 rows" in capsys.readouterr().out
    import pyarrow.parquet as pq

    assert pq.read_table(target).to_pylist() == expman.open_run("lr01", root=mnist_root).metrics("loss").to_pylist()

    assert main(["artifacts", "ls", "lr01", "--root", s3_root]) == 0
    assert "ckpt/weights.bin" in capsys.readouterr().out
    assert main(["artifacts", "get", "lr01", "ckpt/", "-o", str(tmp_path / "ckpt"), "--root", s3_root]) == 0
    assert (tmp_path / "ckpt" / "weights.bin").read_bytes() == (mnist_root.parent / "weights.bin").read_bytes()

    assert main(["ls", "--root", f"s3://{BUCKET}/empty"]) == 0
    assert f"No runs in s3://{BUCKET}/empty." in capsys.readouterr().out


def test_clear_errors_for_uris_readers_cannot_use(s3_root, capsys):
    with pytest.raises(expman.ExpmanError, match=r"cannot open nosuch://bucket/run with pyarrow's filesystems"):
        expman.open_run("nosuch://bucket/run")
    with pytest.raises(expman.ExpmanError, match="nosuch://bucket") as caught:
        expman.list_runs("nosuch://me:very-secret@bucket")
    assert "very-secret" not in str(caught.value)
    assert main(["ls", "--root", "nosuch://bucket"]) == 1
    assert "expman: error: cannot open nosuch://bucket" in capsys.readouterr().err

    with pytest.raises(expman.RunNotFoundError, match=rf"no run 'nope': .* under {s3_root}$"):
        expman.open_run("nope", root=s3_root)
    secret_uri = f"s3://key:very-secret@{BUCKET}/team/mnist/missing?region=us-east-1"
    with pytest.raises(expman.RunNotFoundError) as caught:
        expman.open_run(secret_uri)
    assert f"s3://{BUCKET}/team/mnist/missing is not a run directory" in str(caught.value)
    assert "very-secret" not in str(caught.value)


def test_file_uris_read_the_local_disk(mnist_root):
    run = expman.open_run("lr01", root=mnist_root)
    by_uri = expman.open_run(run.path.as_uri())
    assert isinstance(by_uri.path, Path) and by_uri.path == run.path and by_uri.location == str(run.path)
    assert [r.path for r in expman.list_runs(mnist_root.as_uri())] == [r.path for r in expman.list_runs(mnist_root)]


# --- docs/analysis.md: its object-storage blocks run against the bucket -------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "analysis.md"


def _doc_blocks(title: str) -> list[str]:
    section = DOC.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def _exec(code: str, s3_root: str, **replace: str) -> dict:
    code = code.replace('ROOT = "s3://bucket/prefix"', f"ROOT = {s3_root!r}")
    for old, new in replace.items():
        assert old in code, f"the docs block no longer has {old!r}"
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    return scope


def test_docs_reader_blocks_run_on_the_bucket(s3_server, s3_root):
    reader, own_filesystem = _doc_blocks("Runs on object storage")
    scope = _exec(reader, s3_root)
    assert scope["where"].startswith(f"{s3_root}/mnist/lr0.01-") and scope["status"] == "finished"
    assert scope["params"]["lr"] == 0.01
    assert scope["loss"].column("value").to_pylist()[:2] == [1.5, 0.75]  # mean over the two ranks
    assert scope["stragglers"].column("lag_steps").to_pylist() == [0, 0]
    scope = _exec(reader + own_filesystem, s3_root, **{
        '"minio.lab:9000"': repr(s3_server.endpoint), '"bucket/prefix"': repr(f"{BUCKET}/team"), '"3fa2b1c9"': '"lr01"'})
    assert [r.id for r in scope["runs"]] == ["lr001", "lr01"] and scope["run"].params["lr"] == 0.1


def test_docs_polars_and_duckdb_blocks_query_the_bucket(s3_root):
    pytest.importorskip("polars")
    pytest.importorskip("duckdb")
    polars_block, duckdb_block = _doc_blocks("DuckDB and Polars on object storage")
    scope = _exec(polars_block, s3_root)
    assert scope["best"].rows() == [("lr0.01-lr001", pytest.approx(0.1)), ("lr0.1-lr01", pytest.approx(0.91))]
    assert scope["by_lr"]["lr"].to_list() == [0.01, 0.1]
    scope = _exec(duckdb_block, s3_root)
    assert scope["last_loss"] == [("lr0.01-lr001", 0, 9, 0.1), ("lr0.01-lr001", 1, 9, 0.2),
                                  ("lr0.1-lr01", 0, 9, 0.1), ("lr0.1-lr01", 1, 9, 0.2)]
    import polars as pl

    assert pl.scan_pyarrow_dataset(scope["points"]).select(pl.len()).collect().item() == 81  # 2 runs x 2 ranks x 2 keys x 10, + 1 text
