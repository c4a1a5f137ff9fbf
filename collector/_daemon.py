"""`expman-collector`: command line, config file, logging and signals around the Collector."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import yaml
import zmq

from expman._storage.files import bucket_root, resolve_root, shown
from expman._storage.layout import write_yaml_atomic

from expman._wire.curve_keys import CurveKeyError, client_keys
from expman._errors import ArtifactError, ExpmanError
from expman._options import (DefaultsFormatter, OneLineParser, endpoint, existing_file, fail, log_level, number,
                             positive_seconds)
from expman._version import __version__

from ._artifacts import COMPRESSIONS, ArtifactSettings
from ._auth import CurveServer
from ._bucket import UPLOAD_BATCH_BYTES, UPLOAD_INTERVAL_S, BucketMirror
from ._sdnotify import Notifier, ServiceStatus
from ._server import FLUSH_AGE_BUCKET_S, FLUSH_AGE_S, FORGET_FINISHED_AFTER_S, FORGET_UPLOADED_AFTER_S, Collector

log = logging.getLogger("expman.collector")

_CONFIG_KEYS = {"root", "bind", "heartbeat_timeout", "log_level", "forward", "name", "socket_mode", "hardware_interval",
                "encrypt_artifacts", "key_file", "artifact_compression", "curve_secret", "curve_allow",
                "forward_server_key", "forward_client_key", "group_readable", "staging_dir", "upload_interval",
                "upload_batch_bytes", "forget_after", "part_age"}


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="expman-collector", formatter_class=DefaultsFormatter,
                      description="Receive runs from training ranks and write them to disk.")
    p.add_argument("--version", action="version", version=f"expman-collector {__version__}")
    need = p.add_argument_group("required (on the command line, or as bind: in --config)")
    need.add_argument("--bind", action="append", type=endpoint, metavar="ENDPOINT",
                      help="endpoint to listen on: ipc://PATH or tcp://HOST:PORT (repeatable; port 0 picks one)")
    p.add_argument("--root", help="where run directories go: a folder, or object storage such as s3://bucket/prefix "
                                  "(default: $EXPMAN_ROOT, else ./experiments)")
    p.add_argument("--staging-dir", metavar="DIR",
                   help="with a URI root: the local folder where runs (write-ahead log included) are staged before "
                        "they go up (default: $XDG_STATE_HOME/expman/staging/<name>-<hash of the root>)")
    p.add_argument("--upload-interval", type=positive_seconds, metavar="SECONDS",
                   help=f"with a URI root: upload a run's changes at most this often (default: {UPLOAD_INTERVAL_S:g}; "
                        "at once when a run ends or past --upload-batch-bytes)")
    p.add_argument("--upload-batch-bytes", type=number(int, low=1), metavar="BYTES",
                   help=f"with a URI root: upload at once when this many sealed bytes wait (default: {UPLOAD_BATCH_BYTES})")
    p.add_argument("--forget-after", type=positive_seconds, metavar="SECONDS",
                   help="close a finished run this long after it ended (late frames reopen it until then); with a "
                        "bucket root its staging folder is then removed once all of it is in the bucket "
                        f"(default: {FORGET_FINISHED_AFTER_S:.0f}, {FORGET_UPLOADED_AFTER_S:.0f} with a bucket root)")
    p.add_argument("--part-age", type=positive_seconds, metavar="SECONDS",
                   help="a run's points wait in its write-ahead log at most this long before they become a Parquet part "
                        "(live readers tail the log; a run shorter than this ends with one part) "
                        f"(default: {FLUSH_AGE_S:.0f}, {FLUSH_AGE_BUCKET_S:.0f} with a bucket root, whose readers see only parts)")
    p.add_argument("--config", metavar="FILE", type=config_file,
                   help="YAML file with any of: root, bind (list), heartbeat_timeout, log_level, forward, name, socket_mode, "
                        "hardware_interval, encrypt_artifacts, key_file, artifact_compression, curve_secret, "
                        "curve_allow, forward_server_key, forward_client_key, staging_dir, upload_interval, upload_batch_bytes, forget_after, part_age "
                        "(the command line wins)")
    p.add_argument("--heartbeat-timeout", type=positive_seconds, metavar="SECONDS",
                   help="seconds without a frame before a rank counts as lost (default: two of the rank's heartbeat intervals)")
    p.add_argument("--hardware-interval", type=positive_seconds, metavar="SECONDS",
                   help="seconds between hardware samples for runs that do not choose (default: 1)")
    p.add_argument("--ready-file", metavar="FILE", help="write the bound endpoints here (YAML) once listening")
    p.add_argument("--parent-pid", type=number(int, low=1), help=argparse.SUPPRESS)  # local mode: exit when this process does
    # Local mode shared by a job's ranks on this host: mark a rank lost as soon as its process is gone.
    p.add_argument("--watch-ranks", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help="this collector's name in the files it writes (default: the host name); unique per host sharing a root")
    p.add_argument("--forward", metavar="ENDPOINT", type=endpoint,
                   help="relay every frame to the head collector at this tcp:// endpoint instead of writing here")
    p.add_argument("--idle-exit", type=positive_seconds, metavar="SECONDS",
                   help="exit after this many seconds with no running run and no frame (default: never)")
    p.add_argument("--group-readable", action="store_true", default=None,
                   help="let the group of the run folders read what the collector writes (default: owner only, 0600/0700)")
    p.add_argument("--log-level", type=log_level, metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    p.add_argument("--socket-mode", metavar="MODE", type=_socket_mode_option,
                   help="octal permissions for the ipc socket files after bind, e.g. 0660 "
                        "(who may push: connecting needs write permission; default: as the umask leaves them)")
    p.add_argument("--encrypt-artifacts", action="store_true", default=None,
                   help="encrypt every run's artifacts (runs can also ask with encrypt_artifacts=True; default: off)")
    p.add_argument("--key-file", metavar="FILE",
                   help="master key for artifact encryption (default: $EXPMAN_KEY_FILE, else ~/.config/expman/master.key)")
    p.add_argument("--artifact-compression", choices=COMPRESSIONS,
                   help="compress artifact chunks before storing/encrypting (default: none)")
    p.add_argument("--curve-secret", metavar="FILE",
                   help="CURVE secret key of this collector (`expman keys curve-init`): tcp endpoints then accept "
                        "only clients whose public key is allowed; ipc endpoints are unchanged (default: none, tcp is open)")
    p.add_argument("--curve-allow", metavar="DIR",
                   help="folder of allowed client public keys, *.public (default: allowed/ beside --curve-secret)")
    p.add_argument("--forward-server-key", metavar="FILE",
                   help="with --forward to tcp: the head collector's CURVE public key (default: $EXPMAN_CURVE_SERVER_KEY)")
    p.add_argument("--forward-client-key", metavar="FILE",
                   help="with --forward to tcp: this relay's CURVE secret key (default: $EXPMAN_CURVE_CLIENT_KEY, "
                        "else client.secret in the key folder)")
    return p


def config_file(path: str) -> dict[str, Any]:
    """An argparse type: a collector config file, read and checked (`load_config`)."""
    try:
        return _read_config(path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_config(path: str | None) -> dict[str, Any]:
    """The settings in a collector config file, each checked like its command-line option;
    a bad file ends the program with one line."""
    if not path:
        return {}
    try:
        return _read_config(path)
    except ValueError as exc:
        raise SystemExit(f"expman-collector: {exc}") from None


def _read_config(path: str) -> dict[str, Any]:
    try:
        existing_file(path)
        with open(Path(path).expanduser(), encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not readable YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    unknown = set(config) - _CONFIG_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(_CONFIG_KEYS)}")
    for key, check in _CONFIG_TYPES.items():
        value = config.get(key)
        values = [value] if isinstance(value, (str, int, float)) or key != "bind" else value
        try:
            for item in values if value is not None else ():
                check(item if key == "socket_mode" else str(item))
        except (argparse.ArgumentTypeError, TypeError) as exc:
            raise ValueError(f"{path}: {key}: {exc}") from None
    return config


def _socket_mode_option(text: Any) -> int:
    try:
        return parse_socket_mode(text)
    except SystemExit as exc:
        raise argparse.ArgumentTypeError(str(exc.code).removeprefix("expman-collector: ")) from None


_CONFIG_TYPES: dict[str, Callable[[Any], Any]] = {
    "bind": endpoint, "forward": endpoint, "log_level": log_level, "heartbeat_timeout": positive_seconds,
    "hardware_interval": positive_seconds, "socket_mode": _socket_mode_option, "upload_interval": positive_seconds,
    "upload_batch_bytes": number(int, low=1), "forget_after": positive_seconds, "part_age": positive_seconds,
}


def parse_socket_mode(value: Any) -> int:
    """An octal permission string ('0660', '660', '0o660') as an int; nothing beyond 0777."""
    if not isinstance(value, str):
        # YAML reads 0660 as the octal 432 but 660 as decimal, so an unquoted mode is ambiguous.
        raise SystemExit(f"expman-collector: socket_mode {value!r}: write it as a quoted octal string, e.g. '0660'")
    text = value.strip().lower().removeprefix("0o")
    try:
        mode = int(text, 8)
    except ValueError:
        raise SystemExit(f"expman-collector: socket_mode {value!r} is not an octal number like 0660") from None
    if not 0 <= mode <= 0o777:
        raise SystemExit(f"expman-collector: socket_mode {value!r}: only permission bits (at most 0777)")
    return mode


def apply_socket_mode(endpoints: list[str], mode: int) -> None:
    """chmod the socket file of every ipc endpoint (abstract @names have no file)."""
    paths = [e[len("ipc://"):] for e in endpoints if e.startswith("ipc://") and not e.startswith("ipc://@")]
    if not paths:
        log.warning("socket_mode %04o given, but no ipc endpoint has a socket file to apply it to", mode)
    for path in paths:
        os.chmod(path, mode)
        log.info("socket %s: mode %04o", path, mode)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    config = args.config or {}
    level = log_level(args.log_level or config.get("log_level") or "INFO")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s expman-collector[%(process)d] %(levelname)s %(message)s")
    binds = args.bind or config.get("bind") or []
    if isinstance(binds, str):
        binds = [binds]
    if not binds:
        parser.error("give at least one --bind endpoint (ipc://PATH or tcp://HOST:PORT), or bind: in --config")
    group_readable = args.group_readable if args.group_readable is not None else config.get("group_readable", False)
    if not isinstance(group_readable, bool):
        fail(parser.prog, f"group_readable must be true or false, got {group_readable!r}")
    os.umask(0o027 if group_readable else 0o077)  # run folders, WAL, parts, logs, artifacts: private by default
    bucket_uri = bucket_root(args.root or config.get("root"))
    try:
        root = _staging_dir(args, config, bucket_uri) if bucket_uri else resolve_root(args.root or config.get("root"))
        root.mkdir(parents=True, exist_ok=True)
    except ExpmanError as exc:  # a file:// URI: give the folder as a path
        raise SystemExit(f"expman-collector: {exc}") from None
    except OSError as exc:
        fail(parser.prog, f"cannot create the root {args.root or config.get('root')}: {exc.strerror}", 1)
    socket_mode = args.socket_mode if args.socket_mode is not None else config.get("socket_mode")
    mode = _socket_mode_option(socket_mode) if isinstance(socket_mode, str) else socket_mode
    collector = _collector(parser, args, config, root, list(binds), bucket=bucket_uri is not None)
    if mode is not None:
        apply_socket_mode(collector.endpoints, mode)
    mirror = None
    if bucket_uri:
        mirror = BucketMirror(bucket_uri, root, collector.name,
                              interval=float(args.upload_interval or config.get("upload_interval") or UPLOAD_INTERVAL_S),
                              batch_bytes=int(args.upload_batch_bytes or config.get("upload_batch_bytes") or UPLOAD_BATCH_BYTES))
        collector.attach_mirror(mirror)  # before the mirror starts: a kill mid-removal is finished first
        mirror.start()  # first: runs a previous collector staged but did not upload go up now
    try:
        _serve(collector, args, bucket_uri or root)
    finally:
        if mirror is not None:
            mirror.close()
    return 0


def _staging_dir(args: argparse.Namespace, config: dict[str, Any], uri: str) -> Path:
    """Where a URI root's runs are staged: the option, else a folder under the state folder
    named for this collector and root, so a restarted collector finds what it left."""
    chosen = args.staging_dir or config.get("staging_dir")
    if chosen:
        return Path(chosen).expanduser().resolve()
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    name = args.name or config.get("name") or socket.gethostname()
    return (state / "expman" / "staging" / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}").resolve()


def _collector(parser: argparse.ArgumentParser, args: argparse.Namespace, config: dict[str, Any], root: Path,
               binds: list[str], bucket: bool = False) -> Collector:
    """The Collector the options and config ask for, bound; a bad key file or setting is one line."""
    timeout = args.heartbeat_timeout or config.get("heartbeat_timeout")
    hardware_interval = args.hardware_interval or config.get("hardware_interval") or 1.0
    forget_after = args.forget_after or config.get("forget_after") or (
        FORGET_UPLOADED_AFTER_S if bucket else FORGET_FINISHED_AFTER_S)
    part_age = args.part_age or config.get("part_age")
    key_file = args.key_file or config.get("key_file")
    try:
        artifacts = ArtifactSettings(
            encrypt_all=bool(args.encrypt_artifacts if args.encrypt_artifacts is not None else config.get("encrypt_artifacts", False)),
            key_file=Path(key_file).expanduser() if key_file else None,
            compression=str(args.artifact_compression or config.get("artifact_compression") or "none"),
        )
        curve_secret = args.curve_secret or config.get("curve_secret")
        curve_allow = args.curve_allow or config.get("curve_allow")
        if curve_allow and not curve_secret:
            raise CurveKeyError("--curve-allow needs --curve-secret (the collector's own key)")
        curve = CurveServer.from_files(str(curve_secret), curve_allow) if curve_secret else None
        forward = args.forward or config.get("forward")
        forward_keys = client_keys(args.forward_server_key or config.get("forward_server_key"),
                                   args.forward_client_key or config.get("forward_client_key")) if forward else None
        collector = Collector(root, binds, parent_pid=args.parent_pid, watch_ranks=args.watch_ranks,
                              heartbeat_timeout=float(timeout) if timeout else None,
                              idle_exit=args.idle_exit, forward=forward, curve=curve, forward_keys=forward_keys,
                              name=args.name or config.get("name"), artifacts=artifacts,
                              hardware_interval=float(hardware_interval),
                              forget_after=float(forget_after), part_age=float(part_age) if part_age else None)
    except (ArtifactError, CurveKeyError, ValueError) as exc:  # a key file or setting named by an option
        parser.error(str(exc))
    except zmq.ZMQError as exc:  # the address is taken, or not this host's; the socket file's folder is not writable
        fail(parser.prog, f"cannot listen on {', '.join(binds)}: {exc}", 1)
    return collector


def _serve(collector: Collector, args: argparse.Namespace, root: Path | str) -> None:
    """Run until stopped, with the signals, the ready file and sd_notify around it."""
    # sd_notify (systemd Type=notify): a no-op without $NOTIFY_SOCKET. A private local-mode
    # collector (--parent-pid) is never a unit's main process, so it keeps quiet.
    notifier = Notifier({} if args.parent_pid is not None else None)
    collector.on_periodic = ServiceStatus(notifier, collector)

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: flushing and exiting", signum)
        notifier.stopping("stopping: flushing runs")
        collector.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    target = f"relaying to {collector.relay.head}" if collector.relay else f"writing under {shown(str(root))}"
    if isinstance(root, str):
        target += f" (staged in {collector.root})"
    log.info("listening on %s, %s", ", ".join(collector.endpoints), target)
    if args.ready_file:
        ready: dict[str, Any] = {"pid": os.getpid(), "endpoints": collector.endpoints, "root": shown(str(root))}
        if isinstance(root, str):
            ready["staging"] = str(collector.root)
        write_yaml_atomic(Path(args.ready_file), ready)
    notifier.ready(f"listening on {', '.join(collector.endpoints)}")
    try:
        collector.serve()
    finally:
        notifier.stopping()  # idle exit or parent gone: no signal said it already
        notifier.close()
