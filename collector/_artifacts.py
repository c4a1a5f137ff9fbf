"""Artifacts on the collector: chunks in, content-addressed objects and a manifest out.

A transfer (one artifact from one rank) arrives as numbered chunk frames. Each chunk is
hashed, optionally compressed and encrypted (expman/_storage/crypto.py), and appended to a
staging file under `artifacts/.incoming/` before it is acknowledged, so a transfer
survives a collector restart and resumes where it stopped. The last chunk's frame
carries the rank's SHA-256 of the whole content; when it matches ours the staging file
becomes `artifacts/objects/<aa>/<sha256>[.expa]` (or is dropped, when that object is
already there) and a line is appended to `artifacts/manifest.yaml`.

With encryption on, chunks are sealed in memory before they are written: plaintext
never reaches the collector's disk. Memory per transfer is one chunk plus a hash state.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expman._wire import frames as proto
from expman._storage.artifact_names import normalize_name
from expman._storage.crypto import Header, MasterKey, load_master_key, new_header, recover
from expman._errors import ArtifactError, ProtocolError
from expman._storage.layout import (
    ARTIFACTS_DIR,
    INCOMING_DIR,
    ArtifactRecord,
    format_time,
    manifest_name,
    object_name,
    read_manifests,
    read_yaml,
    write_yaml_atomic,
)

from . import _media

log = logging.getLogger("expman.collector")

COMPRESSIONS = ("none", "zstd")
SYNCFS_OVER = 32  # more files than this to make durable in one turn: one syncfs instead of fsyncs
_SAFE_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


class Deferred(Exception):
    """A chunk that arrived before the one it follows: neither stored nor acknowledged,
    so the rank sends it again (after the missing one)."""


@dataclass
class ArtifactSettings:
    """Collector-wide artifact policy (collector config: encrypt_artifacts, key_file,
    artifact_compression)."""

    encrypt_all: bool = False
    key_file: Path | None = None  # None: $EXPMAN_KEY_FILE, else ~/.config/expman/master.key
    compression: str = "none"

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"artifact compression must be one of {COMPRESSIONS}, got {self.compression!r}")


def _reject(detail: str) -> ProtocolError:
    return ProtocolError("artifact-error", detail)


@dataclass(eq=False)
class _Transfer:
    key: str
    name: str
    size: int
    chunk: int
    logged_at: float
    rank: int
    host: str
    container: bool
    encrypted: bool
    compression: str
    part: Path
    meta: Path | None
    fh: Any
    header: Header | None
    hasher: Any = field(default_factory=hashlib.sha256)
    next_index: int = 0
    received: int = 0
    complete: bool = False
    expected_sha256: str | None = None
    media: dict[str, Any] | None = None  # a media transfer's descriptor (collector/_media.py)
    encoded: Any = None  # its stored form, made when the last chunk arrived


class ArtifactService:
    """The collector's artifact policy and the per-run stores."""

    def __init__(self, settings: ArtifactSettings | None = None) -> None:
        self.settings = settings or ArtifactSettings()
        self._master: MasterKey | None = None
        self._stores: dict[str, RunArtifacts] = {}
        if self.settings.encrypt_all:
            self._master = load_master_key(self.settings.key_file)  # fail at start, not at the first artifact

    def master_key(self) -> MasterKey:
        if self._master is None:
            try:
                self._master = load_master_key(self.settings.key_file)
            except ArtifactError as exc:
                raise _reject(f"encryption was asked for, but the collector has no usable key: {exc}") from None
        return self._master

    def store(self, run: Any) -> RunArtifacts:
        store = self._stores.get(run.info["id"])
        if store is None:
            # On a shared filesystem several collectors write one run: each stages under its
            # own name, and only the run's owner appends to manifest.yaml.
            writer = getattr(run, "writer", None)
            store = self._stores[run.info["id"]] = RunArtifacts(
                run.dir, self, writer, manifest_name(None if getattr(run, "owner", True) else writer))
        return store

    # --- frames --------------------------------------------------------------------------
    def apply(self, run: Any, frame: proto.Frame) -> None:
        """One artifact frame; raises Deferred (no ack yet) or ProtocolError (rejected)."""
        chunk = proto.read_artifact_body(frame.body)
        self.store(run).receive(frame, chunk)

    @staticmethod
    def apply_code(run: Any, frame: proto.Frame) -> None:
        code = frame.body.get("code")
        if not isinstance(code, dict):
            raise ProtocolError("bad-shape", "code body must hold a map under 'code'")
        run.info["code"] = code
        run.touch(force=True)

    # --- between frames --------------------------------------------------------------------
    def sync(self) -> None:
        """Make this turn's chunks durable, finish completed transfers; before the acks."""
        for store in self._stores.values():
            store.sync()

    def close_run(self, uid: str, final: bool) -> None:
        store = self._stores.pop(uid, None)
        if store is not None:
            store.close(final)


class RunArtifacts:
    """One run's `artifacts/` folder."""

    def __init__(self, run_dir: Path, service: ArtifactService, writer: str | None = None,
                 manifest: str = manifest_name()) -> None:
        self.dir = run_dir / ARTIFACTS_DIR
        self.incoming = self.dir / INCOMING_DIR / writer if writer else self.dir / INCOMING_DIR
        self.manifest = manifest
        self.service = service
        self.transfers: dict[str, _Transfer] = {}
        self.failed: set[str] = set()
        self._dirty: dict[str, _Transfer] = {}
        self._ready: list[_Transfer] = []
        self._dirty_dirs: set[Path] = set()
        self._lines: list[str] = []
        self._manifest_fh: Any = None
        self.writer = writer
        self.media: _media.MediaStore | None = None  # made on the first media item

    # --- receiving ----------------------------------------------------------------------------
    def receive(self, frame: proto.Frame, c: proto.ArtifactChunk) -> None:
        key = f"{_safe(frame.sender)}-{c.transfer}"
        if key in self.failed:
            raise _reject(f"transfer {c.transfer} of {c.name!r} has already failed")
        t = self.transfers.get(key)
        if t is None:
            if c.index == 0:
                if c.abort is not None:
                    return
                t = self._begin(key, frame, c)
            else:
                t = self._resume(key, c)
                if t is None:
                    if c.last and self._already_stored(c):
                        return  # finished before a restart; only the ack was lost
                    raise _reject(f"transfer {c.transfer} of {c.name!r}: this collector has no record of its first chunk")
        if c.index < t.next_index:
            if c.last and t.complete and t not in self._ready:
                self._end(t, c)  # resumed a complete staging file: finish it now
            return  # a duplicate
        if c.index > t.next_index:
            raise Deferred()
        if c.abort is not None:
            log.warning("artifact %r from rank %d: the rank gave up: %s", t.name, frame.rank, c.abort)
            self._discard(t)
            return
        try:
            self._append(t, c)
        except ProtocolError:
            self._fail(t)
            raise
        except (OSError, ArtifactError) as exc:
            self._fail(t)
            raise _reject(f"could not store artifact {t.name!r}: {exc}") from None
        if c.last:
            self._end(t, c)

    def _begin(self, key: str, frame: proto.Frame, c: proto.ArtifactChunk) -> _Transfer:
        try:
            name = normalize_name(c.name)
        except ArtifactError as exc:
            raise ProtocolError("bad-values", str(exc)) from None
        if name != c.name:
            raise ProtocolError("bad-values", f"artifact name {c.name!r} is not normalized")
        media = _media.check_descriptor(c.media, c.size) if c.media is not None else None
        settings = self.service.settings
        encrypted = c.encrypt or settings.encrypt_all
        master = self.service.master_key() if encrypted else None
        compression = settings.compression
        container = encrypted or compression != "none"
        assert c.chunk is not None and c.logged_at is not None
        try:
            self.incoming.mkdir(parents=True, exist_ok=True)
            part = self.incoming / f"{key}.part"
            meta = None
            if not c.last:  # a transfer that spans frames can resume after a restart
                meta = self.incoming / f"{key}.yaml"
                write_yaml_atomic(meta, {
                    "name": name, "size": c.size, "chunk": c.chunk, "time": c.logged_at, "rank": frame.rank,
                    "host": frame.host, "encrypted": encrypted, "compression": compression, "container": container,
                    "media": media,
                })
                self._dirty_dirs.add(self.incoming)
            fh = open(part, "wb", buffering=0)
            header = None
            if container:
                header = new_header(master, compression == "zstd", c.chunk)
                fh.write(header.raw)
        except OSError as exc:
            raise _reject(f"could not stage artifact {name!r}: {exc}") from None
        t = _Transfer(key, name, c.size, c.chunk, c.logged_at, frame.rank, frame.host, container, encrypted,
                      compression, part, meta, fh, header, media=media)
        self.transfers[key] = t
        return t

    def _resume(self, key: str, c: proto.ArtifactChunk) -> _Transfer | None:
        """Pick up a transfer a previous collector staged (chunks it acknowledged)."""
        part, meta_path = self.incoming / f"{key}.part", self.incoming / f"{key}.yaml"
        if not (part.exists() and meta_path.exists()):
            return None
        meta = read_yaml(meta_path)
        try:
            fh = open(part, "r+b", buffering=0)
            t = _Transfer(key, meta["name"], int(meta["size"]), int(meta["chunk"]), float(meta["time"]),
                          int(meta["rank"]), str(meta["host"]), bool(meta["container"]), bool(meta["encrypted"]),
                          str(meta["compression"]), part, meta_path, fh, None, media=meta.get("media"))
            if t.container:
                keys = (lambda key_id: self.service.master_key()) if t.encrypted else None
                found = recover(fh, keys, t.hasher.update)
                t.header, t.next_index, t.complete = found.header, found.chunks, found.complete
                fh.truncate(found.end)
                fh.seek(found.end)
                t.received = min(t.size, t.next_index * t.chunk)
                if t.complete:
                    t.received = t.size
            else:
                length = os.fstat(fh.fileno()).st_size
                total_chunks = max(1, -(-t.size // t.chunk))
                if length == t.size:
                    t.next_index, t.complete, keep = total_chunks, True, length
                else:
                    t.next_index = min(length // t.chunk, total_chunks - 1)
                    keep = t.next_index * t.chunk
                fh.truncate(keep)
                fh.seek(0)
                left = keep
                while left:
                    block = fh.read(min(left, 1 << 20))
                    t.hasher.update(block)
                    left -= len(block)
                t.received = keep
        except (OSError, KeyError, TypeError, ValueError, ArtifactError) as exc:
            log.warning("artifact transfer %s: cannot resume from %s: %s", key, part, exc)
            return None
        log.info("artifact %r: resuming at chunk %d", t.name, t.next_index)
        self.transfers[key] = t
        return t

    def _append(self, t: _Transfer, c: proto.ArtifactChunk) -> None:
        if c.name != t.name or c.size != t.size:
            raise ProtocolError("bad-values", f"chunk {c.index} names {c.name!r} ({c.size} bytes), "
                                              f"the transfer is {t.name!r} ({t.size} bytes)")
        n = len(c.data)
        end = t.received + n
        if (not c.last and n != t.chunk) or n > t.chunk or end > t.size or (c.last and end != t.size):
            raise ProtocolError("bad-values", f"artifact {t.name!r}: chunk {c.index} holds {n} bytes, "
                                              f"which does not fit a {t.size}-byte artifact in {t.chunk}-byte chunks")
        t.hasher.update(c.data)
        t.fh.write(t.header.seal(c.index, c.data, c.last) if t.header is not None else c.data)
        t.received = end
        t.next_index += 1
        t.complete = c.last
        self._dirty[t.key] = t

    def _end(self, t: _Transfer, c: proto.ArtifactChunk) -> None:
        digest = t.hasher.hexdigest()
        if digest != c.sha256:
            self._fail(t)
            raise _reject(f"artifact {t.name!r}: content hashes to {digest[:12]}, the rank sent {str(c.sha256)[:12]}")
        t.expected_sha256 = digest
        if t.media is not None:
            try:
                t.encoded = _media.encode_transfer(t, (lambda key_id: self.service.master_key()) if t.encrypted else None)
            except ProtocolError:
                self._fail(t)
                raise
        self._dirty[t.key] = t
        self._ready.append(t)

    def _already_stored(self, c: proto.ArtifactChunk) -> bool:
        record = read_manifests(self.dir).get(c.name)
        return record is not None and record.sha256 == c.sha256

    def _discard(self, t: _Transfer) -> None:
        self.transfers.pop(t.key, None)
        self._dirty.pop(t.key, None)
        try:
            t.fh.close()
        finally:
            for path in (t.part, t.meta):
                if path is not None:
                    path.unlink(missing_ok=True)

    def _fail(self, t: _Transfer) -> None:
        self.failed.add(t.key)
        self._discard(t)

    # --- durability --------------------------------------------------------------------------
    def sync(self) -> None:
        if not (self._dirty or self._ready or self._dirty_dirs or (self.media is not None and self.media.due())):
            return
        dirty = list(self._dirty.values())
        self._dirty.clear()
        if len(dirty) > SYNCFS_OVER and _syncfs(self.dir):
            pass
        else:
            for t in dirty:
                os.fsync(t.fh.fileno())
        ready, self._ready = self._ready, []
        for t in ready:
            try:
                self._finalize(t)
            except OSError as exc:
                log.error("artifact %r: could not move it into the store: %s", t.name, exc)
                self._fail(t)
        if self._lines:
            if self._manifest_fh is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._manifest_fh = open(self.dir / self.manifest, "a", encoding="utf-8")
                self._dirty_dirs.add(self.dir)
            self._manifest_fh.write("".join(self._lines))
            self._manifest_fh.flush()
            os.fsync(self._manifest_fh.fileno())
            self._lines.clear()
        if self.media is not None:
            self.media.sync()
        dirs, self._dirty_dirs = self._dirty_dirs, set()
        for folder in dirs:
            _fsync_dir(folder)

    def _finalize(self, t: _Transfer) -> None:
        if t.media is not None:
            _media.store_encoded(self, t)
            return
        digest = t.expected_sha256
        assert digest is not None
        relative = object_name(digest, t.container)
        target = self.dir / relative
        t.fh.close()
        if target.exists():
            t.part.unlink()  # the same content is already stored: keep one copy
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(t.part, target)
            self._dirty_dirs.update((target.parent, self.incoming))
        if t.meta is not None:
            t.meta.unlink(missing_ok=True)
        self.transfers.pop(t.key, None)
        record = ArtifactRecord(
            name=t.name, size=t.size, sha256=digest, time=format_time(t.logged_at), rank=t.rank, host=t.host,
            encrypted=t.encrypted, compression=t.compression, stored=target.stat().st_size, object=relative,
        )
        self._lines.append(record.to_line())

    def close(self, final: bool) -> None:
        """Flush; a finished run drops the transfers that can no longer complete."""
        try:
            self.sync()
        finally:
            for t in list(self.transfers.values()):
                if final:
                    log.warning("artifact %r of a finished run: transfer incomplete (%d of %d bytes); dropped",
                                t.name, t.received, t.size)
                    self._discard(t)
                else:
                    t.fh.close()  # kept on disk: the rank resumes it when it comes back
            self.transfers.clear()
            if self._manifest_fh is not None:
                self._manifest_fh.close()
                self._manifest_fh = None
            if self.media is not None:
                self.media.close()
            if final:
                _remove_stale_incoming(self.incoming)


def _safe(sender: str) -> str:
    return sender if _SAFE_ID.match(sender) else hashlib.sha256(sender.encode("utf-8", "replace")).hexdigest()[:32]



def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_incoming(folder: Path) -> None:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        log.warning("artifact staging file %s of a finished run removed", folder / name)
        (folder / name).unlink(missing_ok=True)
    for empty in (folder, folder.parent):  # .incoming/<writer>, then .incoming once every writer is done
        try:
            empty.rmdir()
        except OSError:
            break


_libc: Any = None


def _syncfs(path: Path) -> bool:
    """syncfs(2) on the filesystem holding `path`: one call makes many files durable.
    False where it is not available (then the caller fsyncs file by file)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (OSError, AttributeError):
        return False
    try:
        return _libc.syncfs(fd) == 0
    except AttributeError:
        return False
    finally:
        os.close(fd)
