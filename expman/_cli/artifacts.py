"""`expman artifacts ls|get` and `expman keys init`: the artifact subcommands of the CLI.

    expman artifacts ls RUN                    # name, size, sha256, time, rank, encrypted
    expman artifacts get RUN NAME -o PATH      # one artifact; NAME/ or a folder name: all under it
    expman keys init [--key-file PATH]         # a new master key, mode 0600
    expman keys curve-init [--dir DIR]         # CURVE key pairs for tcp endpoints
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path
from typing import Any

from expman._storage.artifact_names import destination, normalize_name
from expman._storage.layout import parse_time
from expman._errors import ArtifactError
from expman._cli import shell
from expman._cli.text import aligned

PROG = "expman"
_KEY_HELP = "master key file (default: $EXPMAN_KEY_FILE, else ~/.config/expman/master.key)"
DEFAULT_TCP_PORT = 5555  # what curve-init suggests; any free port works
_RUN_HELP = "a run directory or URI (s3://...), experiment/run-folder under the root, or a run id"


def add_commands(commands: Any, root_help: str) -> None:
    artifacts = commands.add_parser("artifacts", help="list or fetch a run's artifacts")
    sub = artifacts.add_subparsers(dest="artifacts_command", metavar="COMMAND", required=True)
    ls = sub.add_parser("ls", help="list a run's artifacts")
    ls.add_argument("run", metavar="RUN", help=_RUN_HELP)
    ls.add_argument("--root", help=root_help)
    ls.set_defaults(handler=cmd_artifacts_ls)
    get = sub.add_parser("get", help="write an artifact (or every artifact under a folder name) to PATH")
    get.add_argument("run", metavar="RUN", help=_RUN_HELP)
    get.add_argument("name", metavar="NAME", help="artifact name; 'code/' fetches everything under code/")
    get.add_argument("--output", "-o", metavar="PATH", required=True, type=Path,
                     help="file to write (or a folder to put it in; for NAME/ the folder to fill)")
    get.add_argument("--key-file", help=_KEY_HELP)
    get.add_argument("--root", help=root_help)
    get.set_defaults(handler=cmd_artifacts_get)

    keys = commands.add_parser("keys", help="manage the artifact master key and the CURVE keys of tcp endpoints")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    init = keys_sub.add_parser("init", help="create a new master key file (mode 0600); never overwrites one")
    init.add_argument("--key-file", help=_KEY_HELP)
    init.set_defaults(handler=cmd_keys_init)
    curve = keys_sub.add_parser("curve-init", help="create CURVE key pairs for the collector and a client (secret files "
                                                   "0600); keeps existing keys, so it also adds clients")
    curve.add_argument("--dir", type=Path, help="key folder (default: $EXPMAN_CURVE_DIR, else ~/.config/expman/curve)")
    curve.add_argument("--client", default="client", help="name of the client pair to create (default: client)")
    curve.set_defaults(handler=cmd_keys_curve_init)


def cmd_artifacts_ls(args: argparse.Namespace) -> int:
    from expman._reader.run import open_run

    run = open_run(args.run, root=args.root)
    found = run.artifacts()
    if not found:
        print(f"No artifacts in {run.path.name}.")
        return 0
    rows = [
        [r.name, _size(r.size), r.sha256[:12], _when(r.time), str(r.rank), "yes" if r.encrypted else "no"]
        for r in found
    ]
    print(aligned(["NAME", "SIZE", "SHA256", "TIME", "RANK", "ENCRYPTED"], rows, right=("SIZE", "RANK")))
    return 0


def cmd_artifacts_get(args: argparse.Namespace) -> int:
    from expman._reader.run import open_run

    run = open_run(args.run, root=args.root)
    names = {r.name for r in run.artifacts()}
    wanted = args.name.rstrip("/") if args.name.endswith("/") else args.name
    folder = normalize_name(wanted)
    if args.name.endswith("/") or (folder not in names and any(n.startswith(folder + "/") for n in names)):
        inside = sorted(n for n in names if n.startswith(folder + "/"))
        if not inside:
            raise ArtifactError(f"run {run.path.name} has no artifacts under {folder}/")
        total = 0
        for name in inside:
            target = destination(args.output, name[len(folder) + 1 :])
            run.download_artifact(name, target, key_file=args.key_file)
            total += target.stat().st_size
        noun = "artifact" if len(inside) == 1 else "artifacts"
        print(f"wrote {len(inside)} {noun} ({_size(total)}) under {args.output}")
        return 0
    path = run.download_artifact(folder, args.output, key_file=args.key_file)
    print(f"wrote {folder} ({_size(path.stat().st_size)}) to {path}")
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    from expman._storage.crypto import create_key_file

    key = create_key_file(args.key_file)
    print(f"created {key.path} (mode 0600), key id {key.key_id_hex}")
    print("Back it up: artifacts encrypted with this key cannot be read without it.", file=sys.stderr)
    return 0


def cmd_keys_curve_init(args: argparse.Namespace) -> int:
    from expman._wire.curve_keys import ALLOWED_DIR, SECRET_SUFFIX, init_dir

    made = init_dir(args.dir, args.client)
    folder = made["collector"][0].parent
    for name, (public, created) in made.items():
        print(f"{'created' if created else 'kept   '} {folder / (name + SECRET_SUFFIX)} (mode 0600) and {public.name}")
    print(f"collector: {shell.program('expman-collector')} --bind tcp://0.0.0.0:{DEFAULT_TCP_PORT} "
          f"--curve-secret {shlex.quote(str(folder / ('collector' + SECRET_SUFFIX)))} "
          f"(accepts the public keys in {folder / ALLOWED_DIR})")
    print(f"ranks:     EXPMAN_CURVE_SERVER_KEY={shlex.quote(str(folder / 'collector.public'))} "
          f"EXPMAN_CURVE_CLIENT_KEY={shlex.quote(str(folder / (args.client + SECRET_SUFFIX)))} "
          f"EXPMAN_COLLECTOR=tcp://COLLECTOR_HOST:{DEFAULT_TCP_PORT}")
    print("Copy the client's secret only to the machines that run its ranks.", file=sys.stderr)
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _when(iso: str) -> str:
    seconds = parse_time(iso)
    return iso if seconds is None else dt.datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M:%S")
