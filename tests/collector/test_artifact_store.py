"""The collector's artifact store across restarts: staged chunks survive, transfers resume.

The store is driven in-process with real frames (encoded and decoded by the protocol
module) so each step is deterministic; the last test does the same with kill -9 on a
real collector process.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

import expman
from expman.collector._artifacts import ArtifactService, ArtifactSettings, Deferred
from expman._wire import frames as proto
from expman._storage.crypto import create_key_file
from expman._errors import ProtocolError
from _helpers import wait_for
from conftest import start_collector

CHUNK = 1000


def _frames(data: bytes, name: str = "model.bin", transfer: int = 7, encrypt: bool = False) -> list[proto.Frame]:
    pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    digest = hashlib.sha256(data).hexdigest()
    out = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        body = proto.artifact_body(transfer, i, piece, last, name=name, size=len(data), chunk=CHUNK,
                                   encrypt=encrypt, logged_at=1.7e9, sha256=digest if last else None)
        raw = proto.encode_frame("artifact", run="r1", host="h", rank=3, sender="s1", seq=i, sent_at=1.7e9, body=body)
        out.append(proto.decode_frame(raw))
    return out


def _service(key: Path | None, compression: str = "none") -> ArtifactService:
    return ArtifactService(ArtifactSettings(key_file=key, compression=compression))


def _apply(service: ArtifactService, run, frame) -> None:
    service.apply(run, frame)


@pytest.fixture
def run(tmp_path):
    (tmp_path / "run.yaml").write_text("id: r1\n")
    return SimpleNamespace(dir=tmp_path, info={"id": "r1"})


@pytest.mark.parametrize("mode", ["raw", "encrypted", "zstd"])
def test_a_restarted_collector_resumes_from_the_staged_chunks(run, tmp_path, mode):
    key = tmp_path / "k.key"
    create_key_file(key)
    data = os.urandom(2500) + b"z" * 3000  # six chunks
    frames = _frames(data, encrypt=mode == "encrypted")
    first = _service(key, "zstd" if mode == "zstd" else "none")
    for frame in frames[:3]:
        _apply(first, run, frame)
    first.sync()  # chunks 0-2 durable and acknowledged
    first.close_run("r1", final=False)  # the collector stops (or is killed after its fsync)
    part = next((tmp_path / "artifacts" / ".incoming").glob("*.part"))
    with open(part, "ab") as fh:
        fh.write(b"\x07\x00\x00")  # ... in the middle of writing chunk 3
    if mode == "encrypted":
        assert b"z" * 64 not in part.read_bytes()  # staged chunks are ciphertext too

    second = _service(key, "zstd" if mode == "zstd" else "none")
    with pytest.raises(Deferred):
        _apply(second, run, frames[4])  # resent out of order: not stored, not acknowledged
    _apply(second, run, frames[2])  # a duplicate of a staged chunk: acknowledged again, no effect
    for frame in frames[3:]:
        _apply(second, run, frame)
    second.sync()
    record = expman.open_run(tmp_path).artifacts()[0]
    assert (record.name, record.size, record.rank, record.encrypted) == ("model.bin", len(data), 3, mode == "encrypted")
    assert expman.open_run(tmp_path).read_artifact("model.bin", key_file=key) == data
    assert list((tmp_path / "artifacts" / ".incoming").iterdir()) == []
    _apply(second, run, frames[-1])  # the last ack was lost: resent, recognised, acknowledged
    second.close_run("r1", final=True)


def test_a_complete_staging_file_is_finished_when_the_last_chunk_comes_again(run, tmp_path):
    data = os.urandom(3 * CHUNK)
    frames = _frames(data)
    first = _service(None)
    for frame in frames:
        _apply(first, run, frame)
    for store in first._stores.values():  # killed after writing every chunk, before finishing it
        store._ready.clear()
        store._dirty.clear()
    first.close_run("r1", final=False)
    second = _service(None)
    _apply(second, run, frames[-1])
    second.sync()
    assert expman.open_run(tmp_path).read_artifact("model.bin") == data


def test_chunks_of_a_transfer_the_collector_never_staged_are_refused(run):
    service = _service(None)
    frames = _frames(os.urandom(3 * CHUNK))
    with pytest.raises(ProtocolError, match="no record of its first chunk"):
        _apply(service, run, frames[1])
    with pytest.raises(ProtocolError, match="no record of its first chunk"):
        _apply(service, run, frames[-1])


def test_a_wrong_digest_or_size_is_refused_and_nothing_is_stored(run):
    service = _service(None)
    data = os.urandom(2 * CHUNK)
    frames = _frames(data)
    bad = proto.decode_frame(proto.encode_frame(
        "artifact", run="r1", host="h", rank=0, sender="s1", seq=9, sent_at=1.0,
        body={**frames[1].body, "sha256": "0" * 64}))
    _apply(service, run, frames[0])
    with pytest.raises(ProtocolError, match="hashes to"):
        _apply(service, run, bad)
    with pytest.raises(ProtocolError, match="already failed"):
        _apply(service, run, frames[1])  # chunks still in flight for a failed transfer are refused too
    service.sync()
    assert expman.open_run(run.dir).artifacts() == []
    short = _frames(os.urandom(2 * CHUNK), transfer=8)
    _apply(service, run, short[0])
    truncated = proto.decode_frame(proto.encode_frame(
        "artifact", run="r1", host="h", rank=0, sender="s1", seq=10, sent_at=1.0,
        body={**short[1].body, "data": short[1].body["data"][:-1]}))
    with pytest.raises(ProtocolError, match="does not fit"):
        _apply(service, run, truncated)


def test_kill_9_mid_transfer_then_restart_stores_the_whole_artifact(root, short_dir, tmp_path):
    """Whatever moment the kill lands on, the artifact ends up whole and correct."""
    data = os.urandom(24 * proto.ARTIFACT_CHUNK_BYTES)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    endpoint = f"ipc://{short_dir}/k.sock"
    first = start_collector(root, short_dir, endpoint)
    exp = expman.start_experiment("e", "kill", root=root, collector=endpoint, code_dir=False)
    exp.log_artifact(src)
    incoming = root / "e"
    wait_for(lambda: list(incoming.rglob("*.part")) or exp.stats()["artifacts_stored"], 20, "staging to start")
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    second = start_collector(root, short_dir, endpoint)
    try:
        assert exp.finish(timeout=60) is True
    finally:
        assert second.stop() == 0, second.log()
    run = expman.open_run(exp.run_dir)
    assert run.read_artifact("big.bin") == data
    assert exp.stats()["artifacts_stored"] == 1 and exp.stats()["artifacts_failed"] == 0


@pytest.mark.parametrize("name", ["weird: #name 'q' \"dq\" ü 雪.txt", "- leading dash", "yes", "null", "123", "a/[b]/{c}"])
def test_names_that_mean_something_in_yaml_survive_the_manifest(run, name):
    service = _service(None)
    data = os.urandom(10)
    for frame in _frames(data, name=name):
        _apply(service, run, frame)
    service.sync()
    stored = expman.open_run(run.dir)
    assert [a.name for a in stored.artifacts()] == [name]
    assert stored.read_artifact(name) == data
