"""Artifact objects at rest: the master key file and the `.expa` container format.

The one owner of the encrypted (and/or compressed) object format; docs/storage.md
describes it byte by byte. The collector writes it, the reader reads it, nothing else
touches the bytes. `cryptography` and pyarrow are imported on first use, so importing
this module (the CLI, the reader) stays light.

Container layout (little-endian):

    header   "EXPA" | u8 version=1 | u8 flags | u16 0 | u32 chunk_size | 8 key id
             | 7 nonce prefix | u8 L | L bytes wrapped data key        (28 + L bytes)
    records  u32 n | u8 chunk flags | n bytes body     one record per chunk, in order

Encrypted (header flags bit 0), each object has its own random 256-bit data key,
wrapped with AES-256-GCM under a key derived from the master key (HKDF-SHA256); the
wrap's associated data is the first 28 header bytes. Chunk i's body is AES-256-GCM under
the data key with nonce = prefix(7) | u32 big-endian i | u8 last and associated data =
the whole header | the chunk flags byte: the STREAM construction (Hoang, Reyhanitabar,
Rogaway, Vizár 2015), so a chunk moved, dropped, added after the last one, or altered
(flags included) fails to open. Without encryption a body is u32 crc32(flags | payload)
| payload.

Chunk flags: bit 0 zstd, bit 1 last. The payload is the chunk's bytes, or, with bit 0,
u32 plain length | one zstd frame. A chunk is stored compressed only when that saves
space (header flags bit 1 allows compression at all).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

from expman._errors import ArtifactIntegrityError, ArtifactKeyError
from expman._env import config_dir

log = logging.getLogger("expman")

KEY_FILE_ENV = "EXPMAN_KEY_FILE"
_KEY_LINE_PREFIX = "expman-master-key-v1 "
_KEY_BYTES = 32

MAGIC = b"EXPA"
FORMAT_VERSION = 1
FLAG_ENCRYPTED = 0x01
FLAG_COMPRESSED = 0x02
CHUNK_ZSTD = 0x01
CHUNK_LAST = 0x02
_FIXED = struct.Struct("<4sBBHI8s7sB")  # 28 bytes
_WRAP_NONCE = 12
_GCM_TAG = 16  # bytes of AES-GCM authentication tag
_WRAPPED_LEN = _WRAP_NONCE + _KEY_BYTES + _GCM_TAG
_U32 = struct.Struct("<I")
_COMPRESS_KEEP = 0.97  # keep a compressed chunk only if it is at most this fraction of the plain one
MAX_CHUNK_SIZE = 16 * 1024 * 1024


# --- the master key file --------------------------------------------------------------


def default_key_path() -> Path:
    """$EXPMAN_KEY_FILE, else ~/.config/expman/master.key (honouring $XDG_CONFIG_HOME)."""
    env = os.environ.get(KEY_FILE_ENV)
    if env:
        return Path(env).expanduser()
    return config_dir() / "master.key"


def key_id_of(key: bytes) -> bytes:
    """8 bytes that name a master key without revealing it (stored in each object header)."""
    return hashlib.sha256(b"expman key id\x00" + key).digest()[:8]


class MasterKey:
    """The 256-bit master key from a key file; wraps and unwraps per-object data keys."""

    def __init__(self, key: bytes, path: Path | None = None) -> None:
        if len(key) != _KEY_BYTES:
            raise ArtifactKeyError(f"a master key is {_KEY_BYTES} bytes, got {len(key)}")
        self.path = path
        self.key_id = key_id_of(key)
        self._kek = _hkdf(key, b"expman artifact data-key wrap v1")

    @property
    def key_id_hex(self) -> str:
        return self.key_id.hex()

    def wrap(self, data_key: bytes, aad: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = secrets.token_bytes(_WRAP_NONCE)
        return nonce + AESGCM(self._kek).encrypt(nonce, data_key, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            return AESGCM(self._kek).decrypt(wrapped[:_WRAP_NONCE], wrapped[_WRAP_NONCE:], aad)
        except InvalidTag:
            raise ArtifactIntegrityError("the object header was modified (its data key does not unwrap)") from None

    def __repr__(self) -> str:
        return f"<MasterKey id={self.key_id_hex} path={self.path}>"


def _hkdf(key: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def create_key_file(path: str | os.PathLike[str] | None = None) -> MasterKey:
    """Write a new random master key, readable by the owner only (0600, folder 0700).

    Refuses to overwrite an existing file: a replaced key makes every artifact
    encrypted with the old one unreadable.
    """
    target = Path(path).expanduser() if path is not None else default_key_path()
    if target.exists():
        raise ArtifactKeyError(f"{target} already exists; not overwriting a master key (move it away first)")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(_KEY_BYTES)
    text = (
        "# expman master key. Keep it secret and back it up: artifacts encrypted with it\n"
        "# cannot be read without it. The key id is printed by `expman keys init`.\n"
        f"{_KEY_LINE_PREFIX}{base64.b64encode(key).decode('ascii')}\n"
    )
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return MasterKey(key, target)


def load_master_key(path: str | os.PathLike[str] | None = None) -> MasterKey:
    """The key in `path` (default: `default_key_path()`); ArtifactKeyError saying what to do
    when it is missing or malformed. There is no built-in key."""
    key, target = _read_key_file(path)
    return MasterKey(key, target)


def check_key_file(path: str | os.PathLike[str] | None = None) -> Path:
    """Raise ArtifactKeyError unless the key file exists and parses (no crypto imports)."""
    return _read_key_file(path)[1]


def _read_key_file(path: str | os.PathLike[str] | None) -> tuple[bytes, Path]:
    target = Path(path).expanduser() if path is not None else default_key_path()
    try:
        text = target.read_text(encoding="ascii")
        mode = target.stat().st_mode
    except FileNotFoundError:
        raise ArtifactKeyError(
            f"no master key at {target}: create one with `expman keys init` "
            f"(or point ${KEY_FILE_ENV} / the collector's key_file at an existing key)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactKeyError(f"cannot read the master key {target}: {exc}") from None
    if mode & 0o077:
        log.warning("expman: master key %s is readable by others (mode %o); chmod 600 it", target, mode & 0o777)
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(_KEY_LINE_PREFIX):
            try:
                key = base64.b64decode(line[len(_KEY_LINE_PREFIX):], validate=True)
            except ValueError:
                break
            if len(key) == _KEY_BYTES:
                return key, target
            break
    raise ArtifactKeyError(f"{target} is not an expman master key file (expected a line '{_KEY_LINE_PREFIX}<base64>')")


KeyProvider = Callable[[bytes], MasterKey]


def key_provider(path: str | os.PathLike[str] | None = None) -> KeyProvider:
    """A key lookup for readers: loads the key file on first need and checks its id."""
    cache: list[MasterKey] = []

    def provide(key_id: bytes) -> MasterKey:
        if not cache:
            cache.append(load_master_key(path))
        master = cache[0]
        if master.key_id != key_id:
            raise ArtifactKeyError(
                f"wrong key: the artifact was encrypted with key id {key_id.hex()}, "
                f"but {master.path} holds key id {master.key_id_hex}"
            )
        return master

    return provide


# --- the container ---------------------------------------------------------------------


@dataclass
class Header:
    flags: int
    chunk_size: int
    key_id: bytes
    nonce_prefix: bytes
    wrapped: bytes
    raw: bytes  # the header bytes as stored (the associated data of every chunk)
    data_key: bytes | None = None
    _aead: object = None

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def max_record(self) -> int:
        return self.chunk_size + 64

    def _cipher(self):  # AESGCM, made once
        if self._aead is None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(self.data_key)
        return self._aead

    def _nonce(self, index: int, last: bool) -> bytes:
        return self.nonce_prefix + struct.pack(">IB", index, 1 if last else 0)

    # --- writing ---
    def seal(self, index: int, plain: bytes | memoryview, last: bool) -> bytes:
        """One record (length prefix included) holding chunk `index`. One pass of AES-GCM
        and one copy; the plaintext is never concatenated."""
        if index >= 2**32:
            raise ArtifactIntegrityError("an object may hold at most 2**32 chunks")
        flags = CHUNK_LAST if last else 0
        payload: bytes | memoryview = plain
        if self.compressed and len(plain) >= 64:
            import pyarrow as pa

            packed = pa.compress(plain, codec="zstd", asbytes=True)
            if len(packed) <= len(plain) * _COMPRESS_KEEP:
                flags |= CHUNK_ZSTD
                payload = _U32.pack(len(plain)) + packed
        flag = bytes((flags,))
        if self.encrypted:
            body = self._cipher().encrypt(self._nonce(index, last), payload, self.raw + flag)
            return b"".join((_U32.pack(len(body)), flag, body))
        crc = zlib.crc32(payload, zlib.crc32(flag))
        return b"".join((_U32.pack(len(payload) + 4), flag, _U32.pack(crc), payload))

    # --- reading ---
    def open(self, index: int, record: tuple[int, bytes], last: bool) -> bytes:
        """The plaintext of record `index` ((flags, body) as read); ArtifactIntegrityError
        naming what is wrong."""
        flags, body = record
        flag = bytes((flags,))
        if self.encrypted:
            from cryptography.exceptions import InvalidTag

            cipher = self._cipher()
            aad = self.raw + flag
            try:
                payload = cipher.decrypt(self._nonce(index, last), body, aad)
            except InvalidTag:
                try:  # a precise message where one is possible
                    cipher.decrypt(self._nonce(index, not last), body, aad)
                except InvalidTag:
                    raise ArtifactIntegrityError(
                        f"chunk {index} failed authentication: the object was modified, corrupted or reordered"
                    ) from None
                if last:
                    raise ArtifactIntegrityError(f"the object is truncated: it ends after chunk {index}, which is not its last") from None
                raise ArtifactIntegrityError(f"the object was extended: data follows its final chunk {index}") from None
        else:
            view = memoryview(body)
            if len(body) < 4 or zlib.crc32(view[4:], zlib.crc32(flag)) != _U32.unpack_from(body)[0]:
                raise ArtifactIntegrityError(f"chunk {index} fails its checksum: the object is corrupted")
            payload = view[4:]
        if bool(flags & CHUNK_LAST) != last:  # authenticated (or checksummed) with the body
            if last:
                raise ArtifactIntegrityError(f"the object is truncated: it ends after chunk {index}, which is not its last")
            raise ArtifactIntegrityError(f"the object was extended: data follows its final chunk {index}")
        if flags & CHUNK_ZSTD:
            import pyarrow as pa

            (size,) = _U32.unpack_from(payload)
            if size > self.chunk_size:
                raise ArtifactIntegrityError(f"chunk {index} claims {size} bytes, more than the chunk size")
            try:
                return pa.decompress(payload[4:], decompressed_size=size, codec="zstd", asbytes=True)
            except Exception as exc:
                raise ArtifactIntegrityError(f"chunk {index} does not decompress: {exc}") from None
        return payload if isinstance(payload, bytes) else payload.tobytes()


def new_header(master: MasterKey | None, compress: bool, chunk_size: int) -> Header:
    """A fresh header: with a master key, a new data key wrapped under it."""
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be in 1..{MAX_CHUNK_SIZE}")
    flags = (FLAG_ENCRYPTED if master else 0) | (FLAG_COMPRESSED if compress else 0)
    if master is None:
        fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, flags, 0, chunk_size, bytes(8), bytes(7), 0)
        return Header(flags, chunk_size, bytes(8), bytes(7), b"", fixed)
    data_key = secrets.token_bytes(_KEY_BYTES)
    prefix = secrets.token_bytes(7)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, flags, 0, chunk_size, master.key_id, prefix, _WRAPPED_LEN)
    wrapped = master.wrap(data_key, fixed)
    return Header(flags, chunk_size, master.key_id, prefix, wrapped, fixed + wrapped, data_key)


def read_header(fh: IO[bytes], keys: KeyProvider | None) -> Header:
    """Parse and check a header; with an encrypted object, unwrap its data key via `keys`."""
    fixed = fh.read(_FIXED.size)
    if len(fixed) < _FIXED.size or fixed[:4] != MAGIC:
        raise ArtifactIntegrityError("not an expman artifact object (bad magic or short header)")
    magic, version, flags, _, chunk_size, key_id, prefix, wrapped_len = _FIXED.unpack(fixed)
    if version != FORMAT_VERSION:
        raise ArtifactIntegrityError(f"object format version {version}; this expman reads version {FORMAT_VERSION}")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE or flags & ~(FLAG_ENCRYPTED | FLAG_COMPRESSED):
        raise ArtifactIntegrityError("the object header is malformed")
    wrapped = fh.read(wrapped_len)
    if len(wrapped) != wrapped_len:
        raise ArtifactIntegrityError("the object header is truncated")
    header = Header(flags, chunk_size, key_id, prefix, wrapped, fixed + wrapped)
    if header.encrypted:
        if wrapped_len != _WRAPPED_LEN:
            raise ArtifactIntegrityError("the object header is malformed (wrapped key length)")
        if keys is None:
            raise ArtifactKeyError(f"the object is encrypted (key id {key_id.hex()}) and no key was given")
        header.data_key = keys(key_id).unwrap(wrapped, fixed)
    return header


def _read_record(fh: IO[bytes], header: Header, index: int) -> tuple[int, bytes] | None:
    """The next record's (chunk flags, body); None at a clean end of file."""
    prefix = fh.read(5)
    if not prefix:
        return None
    if len(prefix) < 5:
        raise ArtifactIntegrityError(f"the object is truncated inside chunk {index}")
    (length,) = _U32.unpack_from(prefix)
    if length > header.max_record:
        raise ArtifactIntegrityError(f"chunk {index} claims {length} bytes, more than any chunk can hold: the object is corrupted")
    body = fh.read(length)
    if len(body) != length:
        raise ArtifactIntegrityError(f"the object is truncated inside chunk {index}")
    return prefix[4], body


def read_plaintext(fh: IO[bytes], keys: KeyProvider | None) -> Iterator[bytes]:
    """Yield the object's plaintext chunk by chunk (memory: two chunks). Every check
    fails loudly: a caller that consumes the iterator to the end got exactly what was
    written, or an ArtifactError."""
    header = read_header(fh, keys)
    index = 0
    body = _read_record(fh, header, index)
    if body is None:
        raise ArtifactIntegrityError("the object is truncated: it has no chunks")
    while True:
        following = _read_record(fh, header, index + 1)
        last = following is None
        yield header.open(index, body, last)
        if last:
            return
        body = following
        index += 1


@dataclass
class Recovered:
    """What a partly written container holds (for a collector resuming a transfer)."""

    header: Header
    chunks: int  # whole records that open
    complete: bool  # the last of them is the final chunk
    end: int  # file offset after the last good record (truncate here before appending)


def recover(fh: IO[bytes], keys: KeyProvider | None, on_plain: Callable[[bytes], None]) -> Recovered:
    """Scan a container that may end in a torn record; feed each good chunk's plaintext to
    `on_plain`. Records are opened as 'not last' first; a record that only opens as the
    final chunk ends the scan as complete."""
    header = read_header(fh, keys)
    index, end = 0, fh.tell()
    while True:
        try:
            body = _read_record(fh, header, index)
        except ArtifactIntegrityError:
            body = None  # a torn tail
        if body is None:
            return Recovered(header, index, False, end)
        try:
            plain = header.open(index, body, False)
        except ArtifactIntegrityError:
            try:
                plain = header.open(index, body, True)
            except ArtifactIntegrityError:
                return Recovered(header, index, False, end)
            on_plain(plain)
            return Recovered(header, index + 1, True, fh.tell())
        on_plain(plain)
        index += 1
        end = fh.tell()
