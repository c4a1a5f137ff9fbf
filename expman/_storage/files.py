"""Where readers get a run directory's files: the local disk, or any filesystem pyarrow opens.

The reader, the schema's list/read helpers and the artifact reader reach files only
through a `Files` object, so reading runs from object storage (s3://, gs://, hdfs://)
needs no branches in them. `LOCAL` is the plain os calls the reader always made, so
local reads cost nothing extra (the TUI polls them); `ArrowFiles` wraps a
`pyarrow.fs.FileSystem`. Reading only: a collector whose root is a URI (`bucket_root`)
stages runs on local disk and uploads them itself (collector/_bucket.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePath, PurePosixPath
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from expman._env import ROOT_ENV, chosen_root
from expman._errors import ExpmanError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BUCKET_SCHEMES = frozenset({"s3", "gs", "gcs"})  # pyarrow paths start with the bucket: bucket/key
_STREAM_BUFFER = 1 << 20  # object stores answer each read with a request: read ahead 1 MiB


class Files:
    """File access for readers; paths are absolute within the filesystem."""

    def read_bytes(self, path: PurePath) -> bytes:  # FileNotFoundError when missing
        raise NotImplementedError

    def read_text(self, path: PurePath) -> str:  # UTF-8; FileNotFoundError when missing
        raise NotImplementedError

    def names(self, path: PurePath) -> list[str]:  # entries of a folder; [] when missing
        raise NotImplementedError

    def dirs(self, path: PurePath) -> list[str]:  # sub-folders of a folder; [] when missing
        raise NotImplementedError

    def is_file(self, path: PurePath) -> bool:
        raise NotImplementedError

    def open_input(self, path: PurePath) -> IO[bytes]:  # sequential binary reads
        raise NotImplementedError

    def read_parquet(self, path: PurePath, **kwargs: Any) -> pa.Table:  # pyarrow.parquet.read_table
        raise NotImplementedError

    def uri(self, path: PurePath) -> str:  # for messages: a local path, or a URI without credentials
        raise NotImplementedError


class LocalFiles(Files):
    """The local filesystem (and shared filesystems mounted on it), through plain os calls."""

    def read_bytes(self, path: PurePath) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    def read_text(self, path: PurePath) -> str:
        with open(path, encoding="utf-8") as fh:
            return fh.read()

    def names(self, path: PurePath) -> list[str]:
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def dirs(self, path: PurePath) -> list[str]:
        try:
            with os.scandir(path) as entries:
                return [e.name for e in entries if e.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def is_file(self, path: PurePath) -> bool:
        return os.path.isfile(path)

    def open_input(self, path: PurePath) -> IO[bytes]:
        return open(path, "rb")

    def read_parquet(self, path: PurePath, **kwargs: Any) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(path, **kwargs)

    def uri(self, path: PurePath) -> str:
        return str(path)


class ArrowFiles(Files):
    """A pyarrow filesystem (S3, GCS, HDFS, ...); `prefix` + path is the URI shown to users."""

    def __init__(self, filesystem: pafs.FileSystem, prefix: str) -> None:
        self.filesystem = filesystem
        self.prefix = prefix

    def read_bytes(self, path: PurePath) -> bytes:
        with self.filesystem.open_input_stream(str(path)) as fh:
            return fh.read()

    def read_text(self, path: PurePath) -> str:
        return self.read_bytes(path).decode("utf-8")

    def _infos(self, path: PurePath) -> list[pafs.FileInfo]:
        import pyarrow.fs as pafs

        try:
            return self.filesystem.get_file_info(pafs.FileSelector(str(path), allow_not_found=True))
        except NotADirectoryError:
            return []

    def names(self, path: PurePath) -> list[str]:
        return [info.base_name for info in self._infos(path)]

    def dirs(self, path: PurePath) -> list[str]:
        import pyarrow.fs as pafs

        return [info.base_name for info in self._infos(path) if info.type == pafs.FileType.Directory]

    def is_file(self, path: PurePath) -> bool:
        import pyarrow.fs as pafs

        return self.filesystem.get_file_info(str(path)).type == pafs.FileType.File

    def open_input(self, path: PurePath) -> IO[bytes]:
        return self.filesystem.open_input_stream(str(path), buffer_size=_STREAM_BUFFER)

    def read_parquet(self, path: PurePath, **kwargs: Any) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(str(path), filesystem=self.filesystem, **kwargs)

    def uri(self, path: PurePath) -> str:
        return self.prefix + str(path)


LOCAL = LocalFiles()


def is_uri(where: object) -> bool:
    """True for 'scheme://...' strings (s3://, gs://, hdfs://, file://, ...)."""
    return isinstance(where, str) and _URI.match(where) is not None


def locate(where: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> tuple[Files, PurePath]:
    """How to read `where` (a local path, a URI, or a path inside `filesystem`) and its path there.

    Local paths and file:// URIs read through `LOCAL` and come back as a `Path` (not
    resolved: callers decide); everything else as a `PurePosixPath` inside the filesystem.
    """
    if filesystem is not None:
        import pyarrow.fs as pafs

        if isinstance(filesystem, pafs.LocalFileSystem):
            return LOCAL, Path(_inside(where, "file"))
        return ArrowFiles(filesystem, f"{filesystem.type_name}://"), PurePosixPath(_inside(where, filesystem.type_name))
    text = os.fspath(where)
    if not is_uri(text):
        return LOCAL, Path(text)
    parts = urlsplit(text)
    if parts.scheme.lower() == "file":
        if parts.hostname not in (None, "", "localhost"):
            raise ExpmanError(f"cannot read {shown(text)}: a file:// URI must name this machine (file:///path)")
        from urllib.request import url2pathname  # imported here: it pulls in http and ssl

        return LOCAL, Path(url2pathname(parts.path))
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].replace(text, shown(text))
        raise ExpmanError(f"cannot open {shown(text)} with pyarrow's filesystems: {reason}") from None
    return ArrowFiles(fs, _prefix(shown(text), path)), PurePosixPath(path)


def shown(uri: str) -> str:
    """A URI as it is safe to print: no user name, password or query (which may hold keys)."""
    if not is_uri(uri):
        return uri
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def _prefix(uri: str, path: str) -> str:
    """What goes in front of a filesystem path to show it as a URI: 's3://' for
    s3://bucket/key (path bucket/key), 'hdfs://host:port' for hdfs://host:port/key."""
    base, path = uri.rstrip("/"), path.rstrip("/")
    if path and base.endswith(path):
        return base[: len(base) - len(path)]
    return f"{urlsplit(uri).scheme}://"


def _inside(where: str | os.PathLike[str], type_name: str) -> str:
    """A path inside a filesystem the caller gave: accept its URI form too."""
    text = os.fspath(where)
    if not is_uri(text):
        return text
    parts = urlsplit(text)
    if type_name in _BUCKET_SCHEMES or parts.scheme in _BUCKET_SCHEMES:
        return parts.netloc.rpartition("@")[2] + parts.path
    if type_name == "file":
        from urllib.request import url2pathname

        return url2pathname(parts.path)
    return parts.path


def bucket_root(root: str | os.PathLike[str] | None) -> str | None:
    """The chosen root (`chosen_root`) when it is object storage: any URI but file://."""
    chosen = chosen_root(root)
    if is_uri(chosen) and urlsplit(str(chosen)).scheme.lower() != "file":
        return str(chosen)
    return None


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """The local root folder (`chosen_root`), always absolute. A URI is refused: writers
    check `bucket_root` first (object storage), and a file:// root is given as a path."""
    chosen = chosen_root(root)
    if is_uri(chosen):
        where = "the root" if root is not None else f"${ROOT_ENV}"
        raise ExpmanError(
            f"{where} {shown(str(chosen))!r} is a URI, and a local folder is needed here; readers such as open_run, "
            "list_runs and `expman ls/show/export` accept URIs, and runs are written to object storage by "
            "start_experiment(root=...) and `expman-collector --root`"
        )
    return Path(chosen).expanduser().resolve()
