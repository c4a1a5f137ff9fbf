"""Reading artifacts back from a run directory (behind `Run.artifacts()` and friends).

Every read is streamed (memory: about two chunks) and checked: the content must hash
to the manifest's SHA-256 and have its size, and an encrypted object must open chunk by
chunk under its STREAM nonces. Whatever fails raises an ArtifactError subclass; a reader
never returns bytes that did not pass, and `download` only renames its temp file into
place once they have.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path, PurePath
from typing import Iterator

from expman._storage.artifact_names import normalize_name
from expman._storage.crypto import key_provider, read_plaintext
from expman._errors import ArtifactError, ArtifactIntegrityError
from expman._storage.layout import ARTIFACTS_DIR, ArtifactRecord, read_manifests
from expman._storage.files import LOCAL, Files

_BLOCK = 1024 * 1024


def records(run_dir: PurePath, files: Files = LOCAL) -> dict[str, ArtifactRecord]:
    return read_manifests(run_dir / ARTIFACTS_DIR, files)


def find(run_dir: PurePath, name: str, files: Files = LOCAL) -> ArtifactRecord:
    clean = normalize_name(name)
    known = records(run_dir, files)
    record = known.get(clean)
    if record is None:
        sample = ", ".join(sorted(known)[:5]) + (" ..." if len(known) > 5 else "")
        raise ArtifactError(f"run {run_dir.name} has no artifact {clean!r}" + (f" (it has: {sample})" if known else " (it has none)"))
    return record


def iter_content(
    run_dir: PurePath, record: ArtifactRecord, key_file: str | os.PathLike[str] | None = None, files: Files = LOCAL
) -> Iterator[bytes]:
    """The plaintext in chunks; the size and SHA-256 check runs when the last chunk is out,
    so a consumer that stops early has not been promised anything."""
    path = run_dir / ARTIFACTS_DIR / record.object
    try:
        fh = files.open_input(path)
    except FileNotFoundError:
        raise ArtifactIntegrityError(f"artifact {record.name!r}: its object {record.object} is missing") from None
    hasher, size = hashlib.sha256(), 0
    with fh:
        if record.object.endswith(".expa"):
            chunks: Iterator[bytes] = _named(record, read_plaintext(fh, key_provider(key_file)))
        else:
            chunks = iter(lambda: fh.read(_BLOCK), b"")
        for chunk in chunks:
            hasher.update(chunk)
            size += len(chunk)
            if size > record.size:
                raise ArtifactIntegrityError(f"artifact {record.name!r}: more than its {record.size} bytes")
            yield chunk
    if size != record.size or hasher.hexdigest() != record.sha256:
        raise ArtifactIntegrityError(
            f"artifact {record.name!r}: content does not match the manifest "
            f"({size} bytes, sha256 {hasher.hexdigest()[:12]}; expected {record.size} bytes, {record.sha256[:12]})"
        )


def _named(record: ArtifactRecord, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Put the artifact's name in front of errors raised by the container reader."""
    try:
        yield from chunks
    except ArtifactError as exc:
        raise type(exc)(f"artifact {record.name!r}: {exc}") from None


def read(run_dir: PurePath, name: str, key_file: str | os.PathLike[str] | None = None, files: Files = LOCAL) -> bytes:
    record = find(run_dir, name, files)
    return b"".join(iter_content(run_dir, record, key_file, files))


def download(
    run_dir: PurePath, name: str, dest: str | os.PathLike[str], key_file: str | os.PathLike[str] | None = None,
    files: Files = LOCAL,
) -> Path:
    """Write artifact `name` to `dest` (a local file path, or an existing local folder to put it in)."""
    record = find(run_dir, name, files)
    target = Path(dest)
    if target.is_dir():
        target = target / record.name.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in iter_content(run_dir, record, key_file, files):
                out.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
