"""Artifacts end to end: real collector processes, real files, read back through the reader."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import expman
from expman._wire import frames as proto
from expman._storage.crypto import create_key_file
from expman import ArtifactError, ArtifactIntegrityError, ArtifactKeyError, ArtifactNameError
from _helpers import wait_for
from conftest import start_collector

CH = proto.ARTIFACT_CHUNK_BYTES


def _object_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "artifacts" / "objects").rglob("*") if p.is_file())


def _write(path: Path, data: bytes, old: bool = False) -> Path:
    path.write_bytes(data)
    if old:  # as if written a while ago: an in-place rewrite then always moves mtime
        os.utime(path, (time.time() - 60, time.time() - 60))
    return path


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_round_trip_sizes_around_the_chunk_boundary(root, short_dir, tmp_path, key_file, encrypt):
    c = start_collector(root, short_dir, None, "--key-file", str(key_file))
    try:
        sizes = {"empty": 0, "one": 1, "below": CH - 1, "exact": CH, "above": CH + 1}
        contents = {name: os.urandom(n) for name, n in sizes.items()}
        with expman.start_experiment("e", "sizes", root=root, collector=c.endpoint, code_dir=False,
                                     encrypt_artifacts=encrypt) as exp:
            for name, data in contents.items():
                exp.log_artifact(_write(tmp_path / name, data), f"sizes/{name}.bin")
        assert exp.stats()["artifacts_stored"] == 5 and exp.stats()["artifacts_failed"] == 0
        run = expman.open_run(exp.run_dir)
        listed = {a.name: a for a in run.artifacts()}
        assert sorted(listed) == sorted(f"sizes/{n}.bin" for n in sizes)
        for name, data in contents.items():
            record = listed[f"sizes/{name}.bin"]
            assert (record.size, record.sha256, record.rank, record.encrypted) == (
                len(data), hashlib.sha256(data).hexdigest(), 0, encrypt)
            assert run.read_artifact(record.name) == data
        assert all(p.name.endswith(".expa") == encrypt for p in _object_files(exp.run_dir))
        assert not any(p.is_file() for p in (exp.run_dir / "artifacts" / ".incoming").rglob("*"))
    finally:
        assert c.stop() == 0, c.log()


def test_200_mb_streamed_encrypted_with_bounded_memory(root, short_dir, tmp_path, key_file):
    """≥ 200 MB through frames, encrypted at rest; the collector and the reader stay small."""
    size = 200 * 1024 * 1024 + 12345
    src = tmp_path / "big.bin"
    block = os.urandom(CH)
    digest = hashlib.sha256()
    with open(src, "wb") as fh:  # never the whole file in memory
        for i in range(size // CH):
            piece = i.to_bytes(8, "little") + block[8:]
            fh.write(piece)
            digest.update(piece)
        tail = block[: size % CH]
        fh.write(tail)
        digest.update(tail)
    c = start_collector(root, short_dir, None, "--key-file", str(key_file), "--encrypt-artifacts")
    try:
        exp = expman.start_experiment("e", "big", root=root, collector=c.endpoint, code_dir=False)
        t0 = time.perf_counter()
        exp.log_artifact(src)
        call = time.perf_counter() - t0
        assert exp.finish(timeout=120) is True
        collector_peak_mb = _status_kb(c.proc.pid, "VmHWM") / 1024
    finally:
        assert c.stop() == 0, c.log()
    assert call < 2.0, f"log_artifact took {call:.3f} s for a 200 MB file"  # ~0.2 ms: benchmarks/bench_artifacts.py
    assert collector_peak_mb < 300, f"collector peak RSS {collector_peak_mb:.0f} MB"
    record = expman.open_run(exp.run_dir).artifacts()[0]
    assert (record.size, record.sha256, record.encrypted) == (size, digest.hexdigest(), True)
    (obj,) = _object_files(exp.run_dir)
    with open(obj, "rb") as fh:
        assert block[100:200] not in fh.read(4 * CH)  # ciphertext on disk
    # Stream it back out in a fresh interpreter and measure that reader's peak memory.
    out = tmp_path / "copy.bin"
    code = ("import expman, sys; expman.open_run(sys.argv[1]).download_artifact('big.bin', sys.argv[2]);"
            "print([int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    # (VmHWM, not ru_maxrss: on Linux the latter keeps the forking parent's peak across exec)
    result = subprocess.run([sys.executable, "-c", code, str(exp.run_dir), str(out)], capture_output=True,
                            text=True, check=True)
    assert int(result.stdout.strip()) < 120, f"reader peak RSS {result.stdout.strip()} MB"
    assert out.stat().st_size == size
    copied = hashlib.sha256()
    with open(out, "rb") as fh:
        for piece in iter(lambda: fh.read(CH), b""):
            copied.update(piece)
    assert copied.hexdigest() == digest.hexdigest()


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def test_same_content_is_stored_once(root, collector, tmp_path):
    data = os.urandom(3 * CH + 5)
    with expman.start_experiment("e", "dedup", root=root, collector=collector.endpoint, code_dir=False) as exp:
        exp.log_artifact(_write(tmp_path / "a.bin", data), "first.bin")
        exp.log_artifact(tmp_path / "a.bin", "second.bin")
        exp.log_artifact(tmp_path / "a.bin", "first.bin")  # the same name again: one entry
        exp.log_artifact(_write(tmp_path / "b.txt", b"small"), "x/small.txt")
        exp.log_artifact(tmp_path / "b.txt", "y/small.txt")
    run = expman.open_run(exp.run_dir)
    assert [a.name for a in run.artifacts()] == ["first.bin", "second.bin", "x/small.txt", "y/small.txt"]
    objects = _object_files(exp.run_dir)
    assert len(objects) == 2 and sorted(p.stat().st_size for p in objects) == [5, len(data)]
    assert run.read_artifact("second.bin") == data


def test_snapshot_is_the_content_at_the_call(root, collector, tmp_path):
    """Small files are read during the call; big ones are pinned by a descriptor, so
    rewriting, replacing or deleting them afterwards does not change what is stored."""
    exp = expman.start_experiment("e", "snap", root=root, collector=collector.endpoint, code_dir=False)
    small_old, big_old = b"version 1", os.urandom(5 * CH)
    small = _write(tmp_path / "small.txt", small_old)
    big = _write(tmp_path / "big.bin", big_old)
    gone = _write(tmp_path / "gone.bin", big_old[::-1])
    exp.log_artifact(small)
    exp.log_artifact(big)
    exp.log_artifact(gone)
    small.write_bytes(b"version 2, rewritten in place")  # right away
    tmp = tmp_path / "big.tmp"
    tmp.write_bytes(os.urandom(5 * CH))
    os.replace(tmp, big)  # the usual atomic save of a new checkpoint
    gone.unlink()
    assert exp.finish() is True
    run = expman.open_run(exp.run_dir)
    assert run.read_artifact("small.txt") == small_old
    assert run.read_artifact("big.bin") == big_old
    assert run.read_artifact("gone.bin") == big_old[::-1]


def test_a_file_rewritten_before_it_was_read_is_dropped_loudly(root, short_dir, tmp_path, caplog):
    """No collector yet: the pump sends chunk 0 and waits, the script rewrites the file in
    place, the collector comes up: the change is caught and nothing half-new is stored."""
    endpoint = f"ipc://{short_dir}/late.sock"
    exp = expman.start_experiment("e", "changed", root=root, collector=endpoint, code_dir=False)
    path = _write(tmp_path / "ckpt.bin", os.urandom(6 * CH), old=True)
    exp.log_artifact(path)
    exp.log_artifact(_write(tmp_path / "ok.txt", b"fine"))
    with open(path, "r+b") as fh:  # in place, same size: only mtime tells
        fh.seek(3 * CH)
        fh.write(b"NEW" * 100)
    c = start_collector(root, short_dir, endpoint)
    try:
        with caplog.at_level(logging.ERROR, logger="expman"):
            assert exp.finish(timeout=30) is True
    finally:
        assert c.stop() == 0, c.log()
    assert exp.stats()["artifacts_failed"] == 1 and exp.stats()["artifacts_stored"] == 1
    assert "ckpt.bin" in caplog.text and "changed after log_artifact" in caplog.text
    run = expman.open_run(exp.run_dir)
    assert [a.name for a in run.artifacts()] == ["ok.txt"]
    assert not any(p.is_file() for p in (exp.run_dir / "artifacts" / ".incoming").rglob("*"))


def test_log_artifacts_walks_a_folder_and_does_not_follow_links_out(root, collector, tmp_path):
    outside = _write(tmp_path / "secret.txt", b"outside the folder")
    folder = tmp_path / "out"
    (folder / "sub" / "deeper").mkdir(parents=True)
    _write(folder / "a.txt", b"a")
    _write(folder / "sub" / "b.txt", b"b")
    _write(folder / "sub" / "deeper" / "c.bin", os.urandom(CH + 3))
    (folder / "inside-link.txt").symlink_to(folder / "a.txt")
    (folder / "outside-link.txt").symlink_to(outside)
    (folder / "dangling").symlink_to(tmp_path / "nowhere")
    (folder / "linked-dir").symlink_to(tmp_path, target_is_directory=True)
    with expman.start_experiment("e", "dir", root=root, collector=collector.endpoint, code_dir=False) as exp:
        names = exp.log_artifacts(folder, prefix="outputs")
        followed = exp.log_artifacts(folder, prefix="all", follow_symlinks=True)
    assert names == ["outputs/a.txt", "outputs/inside-link.txt", "outputs/sub/b.txt", "outputs/sub/deeper/c.bin"]
    assert "all/outside-link.txt" in followed and "all/dangling" not in followed
    run = expman.open_run(exp.run_dir)
    assert run.read_artifact("outputs/inside-link.txt") == b"a"
    assert run.read_artifact("all/outside-link.txt") == b"outside the folder"
    log_text = run.log_text()
    assert "skipped 3 entries" in log_text and "outside-link.txt" in log_text and "linked-dir" in log_text


def test_bad_names_are_refused_at_the_call(root, collector, tmp_path):
    path = _write(tmp_path / "f.txt", b"x")
    exp = expman.start_experiment("e", "names", root=root, collector=collector.endpoint, code_dir=False)
    for bad in ["/etc/passwd", "../x", "a/../../x", "a\x00b", "C:evil", "a\\b", "", ".", "line\nbreak"]:
        with pytest.raises(ArtifactNameError):
            exp.log_artifact(path, bad)
    with pytest.raises(ArtifactNameError):
        exp.log_artifacts(tmp_path, prefix="../up")
    with pytest.raises(FileNotFoundError):
        exp.log_artifact(tmp_path / "missing.txt")
    with pytest.raises(IsADirectoryError):
        exp.log_artifact(tmp_path)
    assert exp.log_artifact(path, "./a//b/./c.txt") == "a/b/c.txt"
    assert exp.finish() is True
    assert [a.name for a in expman.open_run(exp.run_dir).artifacts()] == ["a/b/c.txt"]


def test_collector_refuses_traversal_names_sent_by_hand(root, collector):
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(collector.endpoint)
    env = dict(run="r1", host="h", rank=0, sender="s1", sent_at=time.time())
    sock.send(proto.encode_frame("hello", seq=0, body={"experiment": "e", "name": "n", "dir": "n-r1"}, **env))
    assert sock.poll(5000)
    sock.recv()
    for seq, name in enumerate(["../../evil", "/abs", "a/../b"], start=1):
        body = proto.artifact_body(0, 0, b"x", True, name=name, size=1, chunk=CH, encrypt=False,
                                   logged_at=time.time(), sha256=hashlib.sha256(b"x").hexdigest())
        sock.send(proto.encode_frame("artifact", seq=seq, body={**body, "id": seq}, **env))
        assert sock.poll(5000)
        ack = proto.decode_ack(sock.recv())
        assert ack.seqs == [seq] and "bad-values" in ack.info[seq]["rejected"]
    sock.close()
    evil = [p for p in root.rglob("*") if "evil" in p.name]
    assert evil == []


def test_a_tampered_manifest_cannot_point_outside_the_run(root, collector, tmp_path):
    with expman.start_experiment("e", "tamper", root=root, collector=collector.endpoint, code_dir=False) as exp:
        exp.log_artifact(_write(tmp_path / "f.txt", b"content"))
    manifest = exp.run_dir / "artifacts" / "manifest.yaml"
    line = manifest.read_text()
    manifest.write_text(line + line.replace("name: f.txt", "name: ../../etc/passwd")
                        + line.replace("object: objects/", "object: ../../../"))
    run = expman.open_run(exp.run_dir)
    assert [a.name for a in run.artifacts()] == ["f.txt"]  # the bad lines are skipped (and warned about)
    with pytest.raises(ArtifactNameError):
        run.read_artifact("../../etc/passwd")


def test_tampered_object_on_disk_is_an_error_and_download_leaves_nothing(root, short_dir, tmp_path, key_file):
    c = start_collector(root, short_dir, None, "--key-file", str(key_file))
    try:
        with expman.start_experiment("e", "flip", root=root, collector=c.endpoint, code_dir=False,
                                     encrypt_artifacts=True) as exp:
            exp.log_artifact(_write(tmp_path / "m.bin", os.urandom(2 * CH + 9)))
        with expman.start_experiment("e", "plain", root=root, collector=c.endpoint, code_dir=False) as plain:
            plain.log_artifact(_write(tmp_path / "p.bin", os.urandom(100)))
    finally:
        assert c.stop() == 0, c.log()
    (obj,) = _object_files(exp.run_dir)
    original = obj.read_bytes()
    blob = bytearray(original)
    blob[len(blob) // 2] ^= 0x40
    obj.write_bytes(bytes(blob))
    run = expman.open_run(exp.run_dir)
    with pytest.raises(ArtifactIntegrityError, match=r"m.bin.*chunk \d failed authentication"):
        run.read_artifact("m.bin")
    dest = tmp_path / "dl" / "m.bin"
    with pytest.raises(ArtifactIntegrityError):
        run.download_artifact("m.bin", dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    (pobj,) = _object_files(plain.run_dir)
    pobj.write_bytes(b"y" * 100)  # unencrypted objects are checked against their sha256
    with pytest.raises(ArtifactIntegrityError, match="does not match the manifest"):
        expman.open_run(plain.run_dir).read_artifact("p.bin")
    other = tmp_path / "other.key"
    create_key_file(other)
    obj.write_bytes(original)
    with pytest.raises(ArtifactKeyError, match="wrong key"):
        run.read_artifact("m.bin", key_file=other)


def test_encryption_keeps_plaintext_off_the_collector_disk(root, short_dir, tmp_path, key_file):
    marker = b"PLAINTEXT-MARKER-" * 4096  # compressible and easy to find
    c = start_collector(root, short_dir, None, "--key-file", str(key_file), "--artifact-compression", "zstd")
    try:
        with expman.start_experiment("e", "enc", root=root, collector=c.endpoint, code_dir=False,
                                     encrypt_artifacts=True) as exp:
            exp.log_artifact(_write(tmp_path / "m.txt", marker * 40))  # multi-chunk: staged, then moved
    finally:
        assert c.stop() == 0, c.log()
    for path in exp.run_dir.rglob("*"):
        if path.is_file():
            assert b"PLAINTEXT-MARKER" not in path.read_bytes(), path
    record = expman.open_run(exp.run_dir).artifacts()[0]
    assert record.compression == "zstd" and record.stored < record.size // 10
    assert expman.open_run(exp.run_dir).read_artifact("m.txt") == marker * 40


def test_missing_key_is_a_clear_error_everywhere(root, short_dir, tmp_path, monkeypatch, caplog):
    missing = tmp_path / "no.key"
    monkeypatch.setenv("EXPMAN_KEY_FILE", str(missing))
    with pytest.raises(ArtifactKeyError, match="no master key at .*no.key.*expman keys init"):
        expman.start_experiment("e", "nokey", root=root, encrypt_artifacts=True)  # local mode: said at once
    result = subprocess.run([sys.executable, "-m", "expman.collector", "--root", str(root), "--bind",
                             f"ipc://{short_dir}/x.sock", "--encrypt-artifacts"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "no master key" in result.stderr
    c = start_collector(root, short_dir)  # a collector without a key; a run asks for encryption
    try:
        exp = expman.start_experiment("e", "remote", root=root, collector=c.endpoint, code_dir=False,
                                      encrypt_artifacts=True)
        with caplog.at_level(logging.ERROR, logger="expman"):
            exp.log_artifact(_write(tmp_path / "f.bin", os.urandom(3 * CH)))
            assert exp.finish() is True
    finally:
        assert c.stop() == 0, c.log()
    assert exp.stats()["artifacts_failed"] == 1
    assert "f.bin" in caplog.text and "no usable key" in caplog.text
    assert expman.open_run(exp.run_dir).artifacts() == []


def test_remote_tcp_collector(root, short_dir, tmp_path, key_file):
    c = start_collector(root, short_dir, "tcp://127.0.0.1:0", "--key-file", str(key_file))
    try:
        data = os.urandom(3 * CH + 1)
        with expman.start_experiment("e", "tcp", root=root, collector=c.endpoint, code_dir=False,
                                     encrypt_artifacts=True) as exp:
            exp.log_artifact(_write(tmp_path / "w.bin", data), "weights/w.bin")
            exp.log_metric("loss", 0.5, step=1)
        run = expman.open_run(exp.run_dir)
        assert run.read_artifact("weights/w.bin") == data and run.artifacts()[0].encrypted
        assert run.metrics().num_rows == 1
    finally:
        assert c.stop() == 0, c.log()


def test_unknown_artifact_name_says_what_there_is(root, collector, tmp_path):
    with expman.start_experiment("e", "unknown", root=root, collector=collector.endpoint, code_dir=False) as exp:
        exp.log_artifact(_write(tmp_path / "here.txt", b"1"))
    with pytest.raises(ArtifactError, match="no artifact 'there.txt'.*here.txt"):
        expman.open_run(exp.run_dir).read_artifact("there.txt")


def test_artifact_after_finish_is_reported_not_stored(root, collector, tmp_path):
    exp = expman.start_experiment("e", "late", root=root, collector=collector.endpoint, code_dir=False)
    assert exp.finish() is True
    exp.log_artifact(_write(tmp_path / "late.txt", b"late"))
    assert exp.stats()["artifacts_failed"] == 1


def test_run_log_and_run_yaml_are_untouched_by_artifacts(root, collector, tmp_path):
    with expman.start_experiment("e", "yaml", root=root, collector=collector.endpoint, code_dir=False) as exp:
        exp.log_artifact(_write(tmp_path / "f.txt", b"x"))
    info = yaml.safe_load((exp.run_dir / "run.yaml").read_text())
    assert info["status"] == "finished" and "code" not in info
    wait_for(lambda: (exp.run_dir / "artifacts" / "manifest.yaml").exists(), 30, "the manifest")


def test_past_the_descriptor_budget_only_the_path_is_kept_and_checked(root, short_dir, tmp_path, monkeypatch):
    """No collector yet: the pump waits on the first artifact while the second, queued by
    path only, is replaced; the replacement is caught when the pump gets to it."""
    from expman._rank import artifacts as _artifact_pump

    monkeypatch.setattr(_artifact_pump, "OPEN_FDS_MAX", 0)
    endpoint = f"ipc://{short_dir}/late.sock"
    exp = expman.start_experiment("e", "paths", root=root, collector=endpoint, code_dir=False)
    kept = _write(tmp_path / "kept.bin", os.urandom(2 * CH), old=True)
    replaced = _write(tmp_path / "replaced.bin", os.urandom(2 * CH), old=True)
    exp.log_artifact(kept)
    exp.log_artifact(replaced)
    _write(tmp_path / "new.bin", os.urandom(2 * CH))
    os.replace(tmp_path / "new.bin", replaced)
    c = start_collector(root, short_dir, endpoint)
    try:
        assert exp.finish(timeout=30) is True
    finally:
        assert c.stop() == 0, c.log()
    assert [a.name for a in expman.open_run(exp.run_dir).artifacts()] == ["kept.bin"]
    assert exp.stats()["artifacts_failed"] == 1


@pytest.mark.skipif(not os.environ.get("EXPMAN_TEST_REFLINK_DIR"),
                    reason="set EXPMAN_TEST_REFLINK_DIR to a folder on btrfs/XFS (reflink) to run")
def test_reflink_snapshot_is_exact_even_if_rewritten_in_place(root, collector):
    from expman._rank import artifacts as _artifact_pump

    folder = Path(os.environ["EXPMAN_TEST_REFLINK_DIR"])
    path = _write(folder / f"reflink-{os.getpid()}.bin", os.urandom(8 * CH), old=True)
    try:
        old = path.read_bytes()
        exp = expman.start_experiment("e", "reflink", root=root, collector=collector.endpoint, code_dir=False)
        exp.log_artifact(path)
        with open(path, "r+b") as fh:
            fh.write(os.urandom(8 * CH))  # in place, at once: only a clone survives this
        assert exp.finish() is True
        assert path.stat().st_dev not in _artifact_pump._no_reflink
        assert expman.open_run(exp.run_dir).read_artifact(path.name) == old
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith("reflink-")) == [path.name]
    finally:
        path.unlink()


def test_shared_filesystem_collectors_each_keep_their_own_manifest(root, short_dir, tmp_path, run_script):
    """Two hosts' collectors write one run on a shared root: the owner appends to
    manifest.yaml, the other to manifest.<name>.yaml; the reader merges them, and rank 0's
    code capture reaches run.yaml through the owner."""
    a = start_collector(root, short_dir, f"ipc://{short_dir}/a.sock", "--name", "node-a")
    b = start_collector(root, short_dir, f"ipc://{short_dir}/b.sock", "--name", "node-b")
    run_dir = root / "shared" / "job-artjob"
    run_dir.mkdir(parents=True)
    (run_dir / "owner").write_text("node-b\n")  # so rank 0, on node-a, is not on the owner
    try:
        for rank in range(2):
            endpoint = a.endpoint if rank == 0 else b.endpoint
            run_script(f"""
                import expman, pathlib
                p = pathlib.Path({str(tmp_path)!r}) / "r{rank}.txt"
                p.write_text("rank {rank}")
                with expman.start_experiment("shared", "job") as exp:
                    exp.log_artifact(p, "per-rank/r{rank}.txt")
                    exp.log_artifact(p, "same-name.txt")
            """, env={"EXPMAN_RUN_ID": "artjob", "EXPMAN_RANK": str(rank), "EXPMAN_WORLD_SIZE": "2",
                      "EXPMAN_COLLECTOR": endpoint}, check=True)
        run = expman.open_run(run_dir)
        wait_for(lambda: run.status == "finished" and "code" in run.info, 15, "the owner to fold in node-a")
        names = {x.name: x for x in run.artifacts()}
        assert {"per-rank/r0.txt", "per-rank/r1.txt", "same-name.txt"} <= set(names)
        assert names["same-name.txt"].rank == 1  # logged last
        assert run.read_artifact("per-rank/r0.txt") == b"rank 0"
        assert run.info["code"]["source"] == "script" and run.read_artifact(run.info["code"]["script"])
        manifests = sorted(p.name for p in (run_dir / "artifacts").glob("manifest*.yaml"))
        assert manifests == ["manifest.node-a.yaml", "manifest.yaml"]
    finally:
        assert a.stop() == 0, a.log()
        assert b.stop() == 0, b.log()
    assert not any(p.is_file() for p in (run_dir / "artifacts" / ".incoming").rglob("*"))
