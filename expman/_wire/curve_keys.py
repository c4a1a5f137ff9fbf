"""CurveZMQ keys for tcp endpoints: creating, reading and applying them.

The one owner of the key files' layout and of the CURVE socket options. A key folder
made by `expman keys curve-init` holds (z85 text, one key per file):

    collector.public   collector.secret (0600)      the collector's pair
    client.public      client.secret    (0600)      a client pair for ranks and relays
    allowed/client.public                           public keys the collector accepts

The collector (`--curve-secret`, `--curve-allow`) answers ZAP requests itself
(collector/_server.py); ranks and relays read `EXPMAN_CURVE_SERVER_KEY` and
`EXPMAN_CURVE_CLIENT_KEY` and set the client options on their DEALER for tcp endpoints
only: ipc endpoints are protected by file permissions instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import zmq

from expman._errors import ExpmanError
from expman._env import config_dir

SERVER_KEY_ENV = "EXPMAN_CURVE_SERVER_KEY"  # the collector's public key: a file, or the z85 text itself
CLIENT_KEY_ENV = "EXPMAN_CURVE_CLIENT_KEY"  # this client's secret key file
DIR_ENV = "EXPMAN_CURVE_DIR"
ALLOWED_DIR = "allowed"
PUBLIC_SUFFIX = ".public"
SECRET_SUFFIX = ".secret"
_Z85_LEN = 40  # a 32-byte key in z85
_Z85 = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


class CurveKeyError(ExpmanError, ValueError):
    """A CURVE key file that is missing, unreadable or not a z85-encoded 32-byte key."""


def default_dir() -> Path:
    """$EXPMAN_CURVE_DIR, else ~/.config/expman/curve (honouring $XDG_CONFIG_HOME)."""
    env = os.environ.get(DIR_ENV)
    if env:
        return Path(env).expanduser()
    return config_dir() / "curve"


def parse_key(text: str | bytes, where: str) -> bytes:
    """A z85 key (40 characters) from a file's text; also reads pyzmq certificate files."""
    raw = text.encode() if isinstance(text, str) else text
    for line in raw.splitlines():
        line = line.strip()
        if b"-key" in line and b"=" in line:  # zmq.auth certificate: public-key = "..."
            line = line.split(b"=", 1)[1].strip().strip(b'"')
        if len(line) == _Z85_LEN and set(line) <= _Z85:
            return line
    raise CurveKeyError(f"{where}: not a CURVE key (expected 40 z85 characters, as `expman keys curve-init` writes)")


def read_key(path: str | Path, *, secret: bool = False) -> bytes:
    path = Path(path).expanduser()
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise CurveKeyError(f"CURVE key file {path} does not exist (create keys with `expman keys curve-init`)") from None
    except OSError as exc:
        raise CurveKeyError(f"CURVE key file {path}: {exc.strerror}") from None
    if secret and path.stat().st_mode & 0o077:
        raise CurveKeyError(f"CURVE secret key {path} is readable by others; chmod 600 it")
    return parse_key(text, str(path))


def read_allowed(folder: str | Path) -> frozenset[bytes]:
    """Every `*.public` key in a folder (the collector's allowed clients)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CurveKeyError(f"CURVE allowed-keys folder {folder} does not exist")
    keys = frozenset(read_key(p) for p in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")))
    if not keys:
        raise CurveKeyError(f"CURVE allowed-keys folder {folder} holds no *{PUBLIC_SUFFIX} key: no client could connect")
    return keys


def _write(path: Path, text: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(text + b"\n")
    os.chmod(path, mode)


def create_pair(folder: Path, name: str) -> tuple[Path, bool]:
    """NAME.public and NAME.secret (0600) in `folder`; never overwrites. Returns the
    public key's path and whether it was created now."""
    public, secret = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    if secret.exists():
        if not public.exists():
            _write(public, zmq.curve_public(read_key(secret, secret=True)), 0o644)
        return public, False
    pub, sec = zmq.curve_keypair()
    _write(secret, sec, 0o600)
    _write(public, pub, 0o644)
    return public, True


def init_dir(folder: Path | None = None, client: str = "client") -> dict[str, tuple[Path, bool]]:
    """The collector's pair, a client pair named `client`, and that client's public key in
    allowed/. Existing keys are kept, so running it again adds clients."""
    if not client or "/" in client or client.startswith("."):
        raise CurveKeyError(f"client name {client!r}: use a plain name like 'client' or 'node7'")
    folder = (folder or default_dir()).expanduser()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (folder / ALLOWED_DIR).mkdir(mode=0o755, exist_ok=True)
    made = {"collector": create_pair(folder, "collector"), client: create_pair(folder, client)}
    allowed = folder / ALLOWED_DIR / f"{client}{PUBLIC_SUFFIX}"
    if not allowed.exists():
        _write(allowed, read_key(made[client][0]), 0o644)
    return made


@dataclass(frozen=True)
class ClientKeys:
    """What a DEALER needs to talk CURVE to one collector."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket, endpoint: str) -> None:
        """Set the client options; only tcp endpoints use CURVE (call before connect)."""
        if endpoint.startswith("tcp://"):
            sock.curve_serverkey = self.server_public
            sock.curve_publickey = self.public
            sock.curve_secretkey = self.secret

    @classmethod
    def from_files(cls, server_key: str | Path, client_secret: str | Path) -> ClientKeys:
        server = str(server_key)
        if len(server) == _Z85_LEN and set(server.encode()) <= _Z85 and not Path(server).exists():
            server_public = server.encode()  # the key itself, not a file
        else:
            server_public = read_key(server)
        secret = read_key(client_secret, secret=True)
        return cls(server_public, zmq.curve_public(secret), secret)


def curve_refusal_hint(endpoint: str, env: Mapping[str, str] | None = None) -> str | None:
    """The one line a rank prints when the collector at `endpoint` did not confirm its frames
    and CURVE may be why: which of EXPMAN_CURVE_SERVER_KEY / EXPMAN_CURVE_CLIENT_KEY to set or
    check. None for endpoints that never use CURVE (ipc)."""
    if not endpoint.startswith("tcp://"):
        return None
    env = os.environ if env is None else env
    server_key = env.get(SERVER_KEY_ENV)
    if not server_key:
        return (f"if the collector at {endpoint} requires CURVE (expman-collector --curve-secret), it refuses this "
                f"process: set {SERVER_KEY_ENV} to its collector.public and {CLIENT_KEY_ENV} to an allowed "
                f"client.secret (from `expman keys curve-init`)")
    client = env.get(CLIENT_KEY_ENV) or str(default_dir() / f"client{SECRET_SUFFIX}")
    return (f"if the collector at {endpoint} requires CURVE, check that {SERVER_KEY_ENV} ({server_key}) is its "
            f"collector.public and that the public key of {CLIENT_KEY_ENV} ({client}) is in its {ALLOWED_DIR}/ folder")


def client_keys(server_key: str | Path | None = None, client_secret: str | Path | None = None,
                env: Mapping[str, str] | None = None) -> ClientKeys | None:
    """Client keys from the arguments, else $EXPMAN_CURVE_SERVER_KEY and
    $EXPMAN_CURVE_CLIENT_KEY (default: client.secret in the key folder). None when no
    server key is configured: tcp stays plain, and the collector, if it requires CURVE,
    refuses the connection."""
    env = os.environ if env is None else env
    server_key = server_key or env.get(SERVER_KEY_ENV) or None
    if not server_key:
        return None
    if not zmq.has("curve"):
        raise CurveKeyError("this libzmq was built without CURVE support")
    client_secret = client_secret or env.get(CLIENT_KEY_ENV) or default_dir() / f"client{SECRET_SUFFIX}"
    return ClientKeys.from_files(server_key, client_secret)
