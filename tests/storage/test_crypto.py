"""The `.expa` container and the master key file: round trips, every tamper case, wrong keys."""

from __future__ import annotations

import io
import os
import stat
import struct

import pytest

from expman._storage.crypto import (
    KEY_FILE_ENV,
    MasterKey,
    check_key_file,
    create_key_file,
    key_provider,
    load_master_key,
    new_header,
    read_plaintext,
    recover,
)
from expman._errors import ArtifactIntegrityError, ArtifactKeyError

CHUNK = 1024


def _container(data: bytes, master: MasterKey | None, compress: bool = False, chunk: int = CHUNK) -> bytes:
    header = new_header(master, compress, chunk)
    out = [header.raw]
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    for i, piece in enumerate(pieces):
        out.append(header.seal(i, piece, i == len(pieces) - 1))
    return b"".join(out)


def _split(blob: bytes, header_len: int) -> tuple[bytes, list[bytes]]:
    """Header bytes and the records (each with its length prefix)."""
    records, pos = [], header_len
    while pos < len(blob):
        (n,) = struct.unpack_from("<I", blob, pos)
        records.append(blob[pos : pos + 5 + n])  # length, chunk flags, body
        pos += 5 + n
    return blob[:header_len], records


def _read(blob: bytes, keys) -> bytes:
    return b"".join(read_plaintext(io.BytesIO(blob), keys))


@pytest.fixture
def master(tmp_path) -> MasterKey:
    return create_key_file(tmp_path / "master.key")


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7])
@pytest.mark.parametrize("mode", ["encrypted", "encrypted+zstd", "zstd"])
def test_round_trip_at_chunk_boundaries(master, size, mode):
    data = (os.urandom(size // 2) + b"a" * size)[:size]  # half random, half compressible
    use = master if mode.startswith("encrypted") else None
    blob = _container(data, use, compress="zstd" in mode)
    assert _read(blob, key_provider(master.path) if use else None) == data
    if use is not None:
        assert data[:64] not in blob or size < 16  # the plaintext is not in the file


def test_compression_only_keeps_chunks_that_shrink(master):
    text = b"expman " * 2000
    blob = _container(text, master, compress=True, chunk=4096)
    assert len(blob) < len(text) // 5
    noise = os.urandom(3 * 4096)
    assert len(_container(noise, master, compress=True, chunk=4096)) < len(noise) + 200  # stored plain, not grown


def _encrypted_records(master, chunks=4):
    data = os.urandom(chunks * CHUNK - 5)
    blob = _container(data, master)
    header = new_header(master, False, CHUNK)
    head, records = _split(blob, len(header.raw))
    assert len(records) == chunks
    return data, head, records


def test_reordered_chunks_are_detected(master):
    _, head, r = _encrypted_records(master)
    with pytest.raises(ArtifactIntegrityError, match="chunk 1 failed authentication"):
        _read(head + r[0] + r[2] + r[1] + r[3], key_provider(master.path))


def test_truncation_is_detected(master):
    _, head, r = _encrypted_records(master)
    with pytest.raises(ArtifactIntegrityError, match="truncated"):
        _read(head + b"".join(r[:-1]), key_provider(master.path))  # whole chunks dropped
    with pytest.raises(ArtifactIntegrityError, match="truncated"):
        _read(head + b"".join(r)[:-10], key_provider(master.path))  # cut inside a chunk
    with pytest.raises(ArtifactIntegrityError, match="no chunks"):
        _read(head, key_provider(master.path))


def test_extension_is_detected(master):
    _, head, r = _encrypted_records(master)
    with pytest.raises(ArtifactIntegrityError, match="extended"):
        _read(head + b"".join(r) + r[1], key_provider(master.path))  # a valid chunk appended
    with pytest.raises(ArtifactIntegrityError):
        _read(head + b"".join(r) + b"\x00\x00", key_provider(master.path))  # stray bytes


@pytest.mark.parametrize("where", ["header", "wrapped-key", "record-length", "chunk-flags", "ciphertext", "tag"])
def test_bit_flips_are_detected(master, where):
    _, head, r = _encrypted_records(master)
    blob = bytearray(head + b"".join(r))
    offset = {
        "header": 8,  # chunk size field: bound into every chunk's associated data
        "wrapped-key": 40,
        "record-length": len(head) + 1,
        "chunk-flags": len(head) + 4,  # e.g. claiming the chunk is compressed: bound as associated data
        "ciphertext": len(head) + len(r[0]) + 100,
        "tag": len(head) + len(r[0]) - 1,
    }[where]
    blob[offset] ^= 0x01
    with pytest.raises(ArtifactIntegrityError):
        _read(bytes(blob), key_provider(master.path))


def test_plain_container_detects_corruption_truncation_and_extension():
    data = os.urandom(3 * CHUNK)
    blob = _container(data, None, compress=True)
    head, r = _split(blob, len(new_header(None, True, CHUNK).raw))
    assert _read(blob, None) == data
    flipped = bytearray(blob)
    flipped[-3] ^= 0x10
    with pytest.raises(ArtifactIntegrityError, match="checksum"):
        _read(bytes(flipped), None)
    with pytest.raises(ArtifactIntegrityError, match="truncated"):
        _read(head + b"".join(r[:-1]), None)
    with pytest.raises(ArtifactIntegrityError, match="extended"):
        _read(blob + r[0], None)


def test_wrong_key_is_a_clear_error(master, tmp_path):
    data = os.urandom(5000)
    blob = _container(data, master)
    other = create_key_file(tmp_path / "other.key")
    with pytest.raises(ArtifactKeyError, match=f"key id {master.key_id_hex}.*holds key id {other.key_id_hex}"):
        _read(blob, key_provider(other.path))
    # The same key id but a different key (a forged id): the wrapped key does not open.
    forged = bytearray(blob)
    forged[12:20] = other.key_id
    with pytest.raises(ArtifactIntegrityError, match="header was modified"):
        _read(bytes(forged), key_provider(other.path))
    with pytest.raises(ArtifactKeyError, match="no key was given"):
        _read(blob, None)


def test_recover_finds_whole_chunks_and_a_torn_tail(master):
    data = os.urandom(4 * CHUNK)
    blob = _container(data, master)
    head, r = _split(blob, len(new_header(master, False, CHUNK).raw))
    seen: list[bytes] = []
    partial = head + r[0] + r[1] + r[2][:30]  # a collector killed while writing chunk 2
    found = recover(io.BytesIO(partial), key_provider(master.path), seen.append)
    assert (found.chunks, found.complete, found.end) == (2, False, len(head) + len(r[0]) + len(r[1]))
    assert b"".join(seen) == data[: 2 * CHUNK]
    seen.clear()
    found = recover(io.BytesIO(blob), key_provider(master.path), seen.append)
    assert (found.chunks, found.complete) == (4, True) and b"".join(seen) == data


def test_key_file_is_private_never_overwritten_and_checked(tmp_path, monkeypatch):
    path = tmp_path / "cfg" / "expman" / "master.key"
    key = create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_master_key(path).key_id == key.key_id
    with pytest.raises(ArtifactKeyError, match="already exists"):
        create_key_file(path)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(ArtifactKeyError, match="no master key at .*missing.key.*expman keys init"):
        check_key_file()
    (tmp_path / "bad.key").write_text("not a key\n")
    with pytest.raises(ArtifactKeyError, match="not an expman master key"):
        load_master_key(tmp_path / "bad.key")
