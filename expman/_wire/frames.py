"""The wire format between a rank and a collector: the one owner of frame layout.

Every frame is one msgpack map (see docs/protocol.md). Ranks send frames over a ZeroMQ
DEALER socket to the collector's ROUTER; the collector answers with ack frames naming
the sequence numbers it has persisted. Nothing else in the code base packs or unpacks
frames by hand.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import msgpack

from expman._errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_DECODED_ITEMS = 1_000_000  # arrays, maps and their items in one frame (binary columns count 1)

# Frame kinds, rank -> collector.
HELLO = "hello"
HEARTBEAT = "heartbeat"
METRICS = "metrics"
PARAMS = "params"
LOG = "log"
FINISH = "finish"
ARTIFACT = "artifact"  # one chunk of an artifact's content (docs/protocol.md)
CODE = "code"  # what code capture found: folded into run.yaml under `code`
# Collector -> rank.
ACK = "ack"

RANK_KINDS = frozenset({HELLO, HEARTBEAT, METRICS, PARAMS, LOG, FINISH, ARTIFACT, CODE})

_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded rank -> collector frame. `body` is kind-specific (docs/protocol.md)."""

    kind: str
    run: str
    host: str
    rank: int
    sender: str
    seq: int | None
    sent_at: float
    body: dict[str, Any]
    low: int = 0  # every seq below this one is acknowledged: the sender never resends it


def encode_frame(
    kind: str,
    *,
    run: str,
    host: str,
    rank: int,
    sender: str,
    seq: int | None,
    sent_at: float,
    body: dict[str, Any] | None = None,
    low: int = 0,
) -> bytes:
    return msgpack.packb(
        {
            "low": low,
            "v": PROTOCOL_VERSION,
            "kind": kind,
            "run": run,
            "host": host,
            "rank": rank,
            "sender": sender,
            "seq": seq,
            "t": sent_at,
            "body": body or {},
        },
        use_bin_type=True,
    )


class _DecodeBudget:
    """Bounds the Python objects one frame may become: a 64 MiB frame of empty arrays
    would otherwise build ~60 million lists. Counts every array and map with its items."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_DECODED_ITEMS

    def take(self, obj: Any) -> Any:
        self.left -= len(obj) + 1
        if self.left < 0:
            raise ProtocolError("too-complex", f"more than {MAX_DECODED_ITEMS} arrays, maps and items")
        return obj


def decode_frame(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """Decode and check the envelope of one frame; raise ProtocolError naming what is wrong
    (its `seq` attribute is the refused frame's sequence number when it had a usable one)."""
    if len(data) > max_bytes:
        raise ProtocolError("oversized", f"{len(data)} bytes > limit {max_bytes}")
    budget = _DecodeBudget()
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, list_hook=budget.take, object_hook=budget.take,
                              max_array_len=MAX_DECODED_ITEMS, max_map_len=MAX_DECODED_ITEMS)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("not-msgpack", str(exc)) from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad-shape", "frame is not a map")
    try:
        return _frame_from_map(obj)
    except ProtocolError as exc:
        exc.seq = refused_seq(obj)  # type: ignore[attr-defined]  # the collector still answers it
        raise


def refused_seq(obj: dict[Any, Any]) -> int | None:
    """The sequence number a refused frame carried, if it is one a sender could have
    used (so the refusal can be acknowledged: the sender stops resending it)."""
    seq = obj.get("seq")
    return seq if type(seq) is int and 0 <= seq < 2**64 else None


def _frame_from_map(obj: dict[Any, Any]) -> Frame:
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 1.0
        raise ProtocolError("bad-version", f"version {version!r}, this collector speaks {PROTOCOL_VERSION}")
    kind = obj.get("kind")
    if kind not in RANK_KINDS:
        raise ProtocolError("bad-kind", f"unknown kind {kind!r}")
    run, host, rank, sender = obj.get("run"), obj.get("host"), obj.get("rank"), obj.get("sender")
    seq, sent_at, body = obj.get("seq"), obj.get("t"), obj.get("body")
    if not (isinstance(run, str) and run):
        raise ProtocolError("bad-shape", "missing run id")
    if not isinstance(host, str) or not isinstance(sender, str) or not sender:
        raise ProtocolError("bad-shape", "missing host or sender")
    if type(rank) is not int or rank < 0:
        raise ProtocolError("bad-shape", f"bad rank {rank!r}")
    if seq is not None and (type(seq) is not int or seq < 0):
        raise ProtocolError("bad-shape", f"bad seq {seq!r}")
    if not isinstance(sent_at, (int, float)):
        raise ProtocolError("bad-shape", "missing send time")
    if not isinstance(body, dict):
        raise ProtocolError("bad-shape", "body is not a map")
    low = obj.get("low", 0)
    if type(low) is not int or low < 0:
        raise ProtocolError("bad-shape", f"bad low {low!r}")
    return Frame(kind, run, host, rank, sender, seq, float(sent_at), body, low)


@dataclass(frozen=True, slots=True)
class Ack:
    """Collector -> rank: `seqs` are persisted; `info` adds facts per seq (run_dir, rejected);
    `unknown_runs` asks the sender to say hello again (the collector restarted, say)."""

    seqs: list[int]
    info: dict[int, dict[str, Any]]
    unknown_runs: list[str]


def encode_ack(seqs: list[int], info: dict[int, dict[str, Any]] | None = None, unknown_runs: list[str] | None = None) -> bytes:
    obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": ACK, "seqs": seqs, "info": info or {}}
    if unknown_runs:
        obj["unknown_runs"] = unknown_runs
    return msgpack.packb(obj, use_bin_type=True)


def decode_ack(data: bytes) -> Ack:
    obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(obj, dict) or obj.get("kind") != ACK or obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("bad-shape", "not an ack frame")
    return Ack(list(obj.get("seqs") or ()), dict(obj.get("info") or {}), list(obj.get("unknown_runs") or ()))


# --- artifacts ---------------------------------------------------------------------------
# An artifact travels as a transfer: numbered chunks of `chunk` bytes (the last may be
# shorter), each its own acknowledged frame. The first chunk names the artifact, the last
# carries the SHA-256 of the whole content. The rank sends chunk 0 alone, then the middle
# chunks within a byte window, and the last chunk only once every earlier one is
# acknowledged, so the collector never sees a transfer's end before its middle.

ARTIFACT_CHUNK_BYTES = 1024 * 1024
MAX_ARTIFACT_CHUNK_BYTES = 16 * 1024 * 1024


def artifact_body(
    transfer: int,
    index: int,
    data: bytes,
    last: bool,
    *,
    name: str,
    size: int,
    chunk: int,
    encrypt: bool,
    logged_at: float,
    sha256: str | None = None,
    abort: str | None = None,
    media: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"id": transfer, "i": index, "data": data, "last": last, "name": name, "size": size}
    if index == 0:
        body.update(chunk=chunk, encrypt=encrypt, time=logged_at)
        if media is not None:
            body["media"] = media
    if last:
        if abort is not None:
            body["abort"] = abort
        else:
            body["sha256"] = sha256
    return body


@dataclass(frozen=True, slots=True)
class ArtifactChunk:
    """The checked fields of an artifact body."""

    transfer: int
    index: int
    data: bytes
    last: bool
    name: str
    size: int
    chunk: int | None  # first chunk only
    encrypt: bool
    logged_at: float | None  # first chunk only
    sha256: str | None  # last chunk only
    abort: str | None  # last chunk only: the rank gave up on this transfer
    media: dict[str, Any] | None = None  # first chunk only: a media descriptor (collector/_media.py checks it)


_HEX64 = frozenset("0123456789abcdef")


def read_artifact_body(body: dict[str, Any]) -> ArtifactChunk:
    transfer, index, data, last = body.get("id"), body.get("i"), body.get("data"), body.get("last")
    name, size = body.get("name"), body.get("size")
    if type(transfer) is not int or transfer < 0 or type(index) is not int or index < 0:
        raise ProtocolError("bad-shape", "artifact id and chunk index must be ints >= 0")
    if not isinstance(data, bytes) or not isinstance(last, bool):
        raise ProtocolError("bad-shape", "artifact data must be binary and last a bool")
    if not isinstance(name, str) or type(size) is not int or size < 0:
        raise ProtocolError("bad-shape", "artifact name must be a string and size an int >= 0")
    chunk = body.get("chunk")
    logged_at = body.get("time")
    if index == 0:
        if type(chunk) is not int or not 0 < chunk <= MAX_ARTIFACT_CHUNK_BYTES:
            raise ProtocolError("bad-shape", f"artifact chunk size must be 1..{MAX_ARTIFACT_CHUNK_BYTES}")
        if not isinstance(logged_at, (int, float)):
            raise ProtocolError("bad-shape", "the first artifact chunk needs a time")
    sha256, abort = body.get("sha256"), body.get("abort")
    if last and abort is None and not (isinstance(sha256, str) and len(sha256) == 64 and set(sha256) <= _HEX64):
        raise ProtocolError("bad-shape", "the last artifact chunk needs a sha256 (64 lowercase hex digits)")
    if abort is not None and not isinstance(abort, str):
        raise ProtocolError("bad-shape", "artifact abort must be a string")
    media = body.get("media") if index == 0 else None
    if media is not None and not isinstance(media, dict):
        raise ProtocolError("bad-shape", "artifact media must be a map")
    return ArtifactChunk(transfer, index, data, last, name, size, chunk, bool(body.get("encrypt")),
                         None if logged_at is None else float(logged_at), sha256 if last else None,
                         abort if last else None, media)


def require_little_endian() -> None:
    """Binary columns are little-endian; refuse to run where packing would silently differ."""
    if not _LITTLE_ENDIAN:
        raise ProtocolError("unsupported-platform", "expman's wire format needs a little-endian host")
