"""The `expman` command: list, show and export runs, and a demo run to start from.

    expman demo                      # a simulated training run under ./experiments
    expman ls                        # runs, newest first
    expman show <id>                 # one run: status, params, last metric values
    expman export <id> -o m.parquet  # the metrics table as Parquet or CSV
    expman export <id> -f tensorboard -o tb/   # TensorBoard event files, a folder per rank
    expman import tb/ -e imported    # TensorBoard scalars into a new run
    expman artifacts ls <id>         # artifacts: ls, get (expman/_cli/artifacts.py)
    expman keys init                 # a master key for artifact encryption
    expman sync                      # deliver spooled frames once the collector is back

One function per subcommand; each returns the exit code. A bad option value (a root that
does not exist, an unknown format) prints one line and exits 2, like argparse; errors
found while working (an unknown run, an unwritable path) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from expman._cli import shell
from expman._cli.progress import Progress
from expman._cli.text import aligned
from expman._cli.artifacts import add_commands as add_artifact_commands
from expman._cli.listing import summary_fields
from expman._errors import ExpmanError
from expman._env import ROOT_ENV, chosen_root
from expman._storage.files import resolve_root
from expman._reader.params import flat_params
from expman._reader.run import Run, open_run, runs_with_yaml
from expman._storage.layout import KEY, RANK, STEP, TEXT, TIME, VALUE, parse_time
from expman._storage.files import is_uri, shown
from expman._options import DefaultsFormatter, OneLineParser, endpoint, fail, number, positive_seconds
from expman._version import __version__

if TYPE_CHECKING:
    import pyarrow as pa

PROG = "expman"
FORMATS = ("csv", "parquet", "tensorboard")
SUFFIX_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_MAX_RANK_LINES = 8
_MAX_TEXT = 60
_EXPORT_BATCH_ROWS = 256 * 1024


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except BrokenPipeError:  # `expman ls | head`: the reader left, not an error worth a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (ExpmanError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Experiment tracking for distributed training.",
                           formatter_class=DefaultsFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=lambda **kw: OneLineParser(formatter_class=DefaultsFormatter, **kw))

    root_help = f"the runs' root folder, or a URI such as s3://bucket/prefix (default: ${ROOT_ENV}, else ./experiments)"
    run_help = "a run directory or URI (s3://...), experiment/run-folder under the root, or a run id"

    ls = commands.add_parser("ls", help="list runs, newest first")
    ls.add_argument("--root", help=root_help)
    ls.add_argument("--experiment", "-e", metavar="NAME", help="only runs of this experiment")
    ls.set_defaults(handler=cmd_ls)

    show = commands.add_parser("show", help="show one run: status, params, last metric values")
    show.add_argument("run", metavar="RUN", help=run_help)
    show.add_argument("--root", help=root_help)
    show.set_defaults(handler=cmd_show)

    export = commands.add_parser("export", help="write a run's metrics as CSV, Parquet or TensorBoard event files")
    export.add_argument("run", metavar="RUN", help=run_help)
    export.add_argument("--format", "-f", choices=FORMATS,
                        help="output format (default: from the suffix of --output: .csv, .parquet or .pq)")
    export.add_argument("--output", "-o", metavar="PATH", required=True, type=Path,
                        help="file to write (a folder for tensorboard: one rank<N>/ folder per rank)")
    export.add_argument("--keys", "-k", type=_key_list, help="comma-separated metric keys (default: all)")
    export.add_argument("--root", help=root_help)
    export.set_defaults(handler=cmd_export)

    sync = commands.add_parser("sync", help="deliver spooled frames (a collector was down) to a collector")
    sync.add_argument("--spool", metavar="DIR", type=Path,
                      help="spool folder (default: $EXPMAN_SPOOL_DIR, else $XDG_STATE_HOME/expman/spool)")
    sync.add_argument("--collector", metavar="ENDPOINT", type=endpoint,
                      help="collector endpoint (default: $EXPMAN_COLLECTOR, else the one the spool names, "
                           "else a local collector for the runs' root)")
    sync.add_argument("--timeout", type=positive_seconds, default=60.0, metavar="SECONDS",
                      help="seconds to wait for each file's acks")
    sync.set_defaults(handler=cmd_sync)

    imp = commands.add_parser("import", help="read TensorBoard runs (scalars and hparams) into new runs")
    imp.add_argument("logdir", metavar="DIR", type=Path,
                     help="a TensorBoard log folder: each folder under it that holds event files is a run "
                          "(rank<N>/ folders are ranks of one run)")
    imp.add_argument("--experiment", "-e", metavar="NAME", help="the experiment to put the runs in (default: default)")
    imp.add_argument("--name", "-n", metavar="NAME",
                     help="the run's name when DIR holds one run (default: the run folder's name)")
    imp.add_argument("--root", help=root_help)
    imp.set_defaults(handler=cmd_import)

    demo = commands.add_parser("demo", help="log a simulated training run (no setup needed)")
    demo.add_argument("--root", help=root_help)
    demo.add_argument("--steps", type=number(int, low=1, high=10_000_000), default=None,
                      help="training steps to simulate (default: 2000)")
    demo.add_argument("--seed", type=number(int), default=0, help="random seed for the simulated noise")
    demo.set_defaults(handler=cmd_demo)

    add_artifact_commands(commands, root_help)  # artifacts ls|get, keys init
    return parser


# --- subcommands ------------------------------------------------------------------------


def cmd_sync(args: argparse.Namespace) -> int:
    from expman._rank.spool import spool_dir
    from expman._rank.sync import sync_folder

    folder = args.spool or spool_dir()
    delivered, frames, left = sync_folder(folder, args.collector, args.timeout, out=sys.stdout)
    print(f"{delivered} spool file(s) delivered ({frames} frames), {left} left in {folder}")
    return 0 if left == 0 else 1


def cmd_ls(args: argparse.Namespace) -> int:
    chosen = chosen_root(args.root)
    if not is_uri(chosen) and not resolve_root(chosen).is_dir():
        named = "--root" if args.root is not None else f"${ROOT_ENV}" if os.environ.get(ROOT_ENV) else "the default root"
        hint = f"; `{shell.program(PROG)} demo` logs a run there" if named == "the default root" else ""
        fail(PROG, f"{named} {resolve_root(chosen)} is not a folder{hint}")
    runs = runs_with_yaml(args.root, experiment=args.experiment)
    if not runs:
        where = shown(str(chosen)) if is_uri(chosen) else resolve_root(chosen)
        scope = f"experiment {args.experiment!r} under {where}" if args.experiment else where
        print(f"No runs in {scope}. Try `{shell.program(PROG)} demo` to log one.")
        return 0
    rows = []
    for run, text in runs:
        info = summary_fields(text, run.location)  # the file list_runs read: not a second time
        rows.append(
            [
                str(info.get("experiment") or run.path.parent.name),
                run.path.name,
                str(info.get("id", "")),
                str(info.get("status", "unknown")),
                _local_time(info.get("started_at")),
                _duration(_run_seconds(info)),
                _rank_states(info),
            ]
        )
    print(aligned(["EXPERIMENT", "RUN", "ID", "STATUS", "STARTED", "DURATION", "RANKS"], rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    run = open_run(args.run, root=args.root)
    info = run.info
    fields = [
        ("run", f"{info.get('experiment', run.path.parent.name)}/{info.get('name', run.path.name)}"),
        ("id", str(info.get("id", ""))),
        ("status", str(info.get("status", "unknown"))),
        ("path", run.location),
        ("started", _local_time(info.get("started_at"), offset=True)),
        ("ended", _local_time(info.get("ended_at"), offset=True)),
        ("duration", _duration(_run_seconds(info))),
        ("hosts", ", ".join(map(str, info.get("hosts") or [])) or "-"),
        ("ranks", _rank_summary(info)),
        *(("", line) for line in _rank_lines(info)),
        ("parent", _run_label(run, info.get("parent")) if info.get("parent") else "-"),
        ("children", ", ".join(_run_label(run, c) for c in info.get("children") or []) or "-"),
    ]
    if info.get("tags"):
        fields.append(("tags", ", ".join(map(str, info["tags"]))))
    error = info.get("error")
    if isinstance(error, dict):
        fields.append(("error", f"{error.get('type', 'error')}: {_one_line(str(error.get('message', '')))}"))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name:<{width}}  {value}")
    if isinstance(error, dict) and str(error.get("traceback") or "").strip():
        print("\ntraceback (from run.yaml)")
        print(_indent(str(error["traceback"]).rstrip()))

    params = list(flat_params(run.params).items())
    print("\nparams" if params else "\nparams: none")
    for name, value in params:
        print(f"  {name} = {_param_text(value)}")

    metrics = _last_values(run.metrics())
    if not metrics:
        print("\nmetrics: none")
        return 0
    print("\nmetrics (last value)")
    print(_indent(aligned(metrics[0], metrics[1:], right=("RANK", "LAST", "STEP", "POINTS"))))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    fmt = args.format or SUFFIX_FORMATS.get(args.output.suffix.lower())
    if fmt is None:
        fail(PROG, f"cannot tell the format of {args.output} from its suffix: name it .csv, .parquet or .pq, "
                   f"or give --format {{{','.join(FORMATS)}}}")
    run = open_run(args.run, root=args.root)
    if fmt == "tensorboard":
        from expman._compat.tensorboard import export_tensorboard

        with Progress("exporting", "points") as bar:
            counts = export_tensorboard(run, args.output, args.keys, progress=bar.update)
        skipped = f", {counts['text_skipped']} text points skipped" if counts["text_skipped"] else ""
        if counts["media_skipped"]:
            skipped += f", {counts['media_skipped']} tables and videos skipped (no TensorBoard kind)"
        media = "".join(f", {counts[k]} {k}" for k in ("images", "histograms", "audio") if counts[k])
        print(f"wrote {counts['scalars']} scalars{media} of {counts['ranks']} {_plural(counts['ranks'], 'rank')} "
              f"to {args.output} (tensorboard{skipped})")
        return 0
    table = run.metrics(args.keys)
    with Progress("exporting", "rows", total=table.num_rows) as bar:
        _write_table(table, args.output, fmt, bar.update)
    if args.keys:
        found = set(table.column(KEY).unique().cast("string").to_pylist()) if table.num_rows else set()
        missing = [k for k in args.keys if k not in found]
        if missing:
            print(f"{PROG}: warning: no points for {', '.join(missing)}", file=sys.stderr)
    print(f"wrote {table.num_rows} rows to {args.output} ({fmt})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from expman._rank.start import shutdown
    from expman._compat.tensorboard import import_tensorboard

    if not args.logdir.is_dir():
        fail(PROG, f"{args.logdir} is not a folder")
    try:
        with Progress("importing", "points") as bar:
            result = import_tensorboard(args.logdir, experiment=args.experiment, name=args.name, root=args.root,
                                        progress=bar.update)
    finally:
        shutdown()  # the collector writes run.yaml as it exits
    root_flag = f" --root {shlex.quote(args.root)}" if args.root else ""
    for run in result["runs"]:
        media = "".join(f", {run[k]} {k}" for k in ("images", "histograms", "audio") if run[k])
        print(f"imported {run['scalars']} scalars{media} of {run['ranks']} {_plural(run['ranks'], 'rank')}"
              + (f" and {run['params']} hparams" if run["params"] else "") + f" into {run['run_dir']}")
        print(f"  {shell.program(PROG)} show {run['id']}{root_flag}")
    for what, count in sorted(result["skipped"].items()):
        print(f"skipped {count} {what}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from expman._cli.demo import DEFAULT_STEPS, run_demo

    steps = args.steps or DEFAULT_STEPS
    started = time.monotonic()
    result = run_demo(root=args.root, steps=steps, seed=args.seed)
    elapsed = time.monotonic() - started
    root_flag = f" --root {shlex.quote(args.root)}" if args.root else ""
    print(f"demo run {result.status} in {elapsed:.1f}s: {steps} steps, {result.points} points")
    print(f"  run dir:  {result.run_dir}")
    print(f"  id:       {result.uid}")
    print(f"  child:    {result.child_dir} (eval)")
    activate = shell.activate_hint()
    print("view it" + (f" (or `{activate}` first, then plain `{PROG}` and `python` work):" if activate else ":"))
    print(f"  {shell.program(PROG)} show {result.uid}{root_flag}")
    print(f"  {shell.program(PROG)} ls{root_flag}")
    code = f"import expman; print(expman.open_run({json.dumps(str(result.run_dir))}).metrics())"
    print(f"  {shell.python()} -c {shlex.quote(code)}")
    print(f"  # a pyarrow Table; DuckDB and Polars read {result.run_dir}/metrics/*.parquet too")
    return 0


# --- helpers ---------------------------------------------------------------------------


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _local_time(iso: Any, offset: bool = False) -> str:
    """A run.yaml time in this machine's time zone ('-' when missing, as given when unreadable)."""
    if not iso:
        return "-"
    seconds = parse_time(iso)
    if seconds is None:
        return str(iso)
    return dt.datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M:%S %z" if offset else "%Y-%m-%d %H:%M:%S")


def _run_seconds(info: dict[str, Any]) -> float | None:
    """The recorded duration; for a run still running, the time since it started."""
    if info.get("duration_s") is not None:
        return float(info["duration_s"])
    started = parse_time(info.get("started_at")) if info.get("status") == "running" else None
    return None if started is None else time.time() - started


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _rank_summary(info: dict[str, Any]) -> str:
    ranks = info.get("ranks") or {}
    counts: dict[str, int] = {}
    for rank in ranks.values():
        status = str(rank.get("status", "unknown"))
        counts[status] = counts.get(status, 0) + 1
    world = info.get("world_size") or len(ranks)
    states = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return f"{len(ranks)} of {world} seen" + (f" ({states})" if states else "")


def _rank_states(info: dict[str, Any]) -> str:
    """Short per-rank state for `ls`: "4/4 finished", or "2 finished, 1 lost of 4"."""
    ranks = info.get("ranks") or {}
    world = info.get("world_size") or len(ranks)
    counts: dict[str, int] = {}
    for rank in ranks.values():
        counts[str(rank.get("status", "unknown"))] = counts.get(str(rank.get("status", "unknown")), 0) + 1
    if len(counts) == 1:
        (status, n), = counts.items()
        return f"{n}/{world} {status}"
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + f" of {world}"


def _rank_lines(info: dict[str, Any]) -> Iterator[str]:
    ranks = sorted((info.get("ranks") or {}).items(), key=lambda item: int(item[0]))
    for rank_id, rank in ranks[:_MAX_RANK_LINES]:
        last = rank.get("last_step")
        line = f"rank {rank_id} on {rank.get('host', '?')}: {rank.get('status', 'unknown')}"
        line += f", last step {last}" if last is not None else ""
        if rank.get("status") == "running" and rank.get("last_heartbeat"):
            line += f", heartbeat {_local_time(rank['last_heartbeat'])}"
        if isinstance(rank.get("error"), dict):
            line += f" ({rank['error'].get('type', 'error')})"
        yield line
    if len(ranks) > _MAX_RANK_LINES:
        yield f"... and {len(ranks) - _MAX_RANK_LINES} more ranks"


def _run_label(run: Run, uid: Any) -> str:
    """A linked run's folder name when it sits beside this one (children do), else its id."""
    matches = [name for name in run._files.dirs(run.path.parent) if name.endswith(f"-{uid}")]
    return f"{matches[0]} ({uid})" if len(matches) == 1 else str(uid)



def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def _number(value: float) -> str:
    return f"{value:.6g}"


def _last_values(table: pa.Table) -> list[list[str]]:
    """Header plus one row per key (per key and rank when several ranks logged): the last point."""
    if table.num_rows == 0:
        return []
    import pyarrow.compute as pc

    keep_nulls = pc.ScalarAggregateOptions(skip_nulls=False)
    last = table.group_by([KEY, RANK], use_threads=False).aggregate(
        [
            (VALUE, "last", keep_nulls),
            (TEXT, "last", keep_nulls),
            (STEP, "last", keep_nulls),
            (STEP, "count", pc.CountOptions(mode="all")),
        ]
    )
    by_rank = len(set(last.column(RANK).to_pylist())) > 1
    rows = []
    for r in sorted(last.to_pylist(), key=lambda r: (str(r[KEY]), r[RANK])):
        if r[f"{TEXT}_last"] is not None:
            shown = _one_line(r[f"{TEXT}_last"])
        elif r[f"{VALUE}_last"] is not None:
            shown = _number(r[f"{VALUE}_last"])
        else:
            shown = "-"
        step = r[f"{STEP}_last"]
        rank = [str(r[RANK])] if by_rank else []
        rows.append([str(r[KEY]), *rank, shown, "-" if step is None else str(step), str(r[f"{STEP}_count"])])
    return [["KEY", *(["RANK"] if by_rank else []), "LAST", "STEP", "POINTS"], *rows]


def _plural(n: int, noun: str) -> str:
    return noun if n == 1 else f"{noun}s"


def _write_table(table: pa.Table, path: Path, fmt: str, progress: Callable[[int], None]) -> None:
    """CSV or Parquet, in batches of rows so a long export can show its progress."""
    if fmt == "csv":
        import pyarrow.csv as pacsv

        table = _csv_ready(table)
        writer = pacsv.CSVWriter(path, table.schema)
    else:
        import pyarrow.parquet as pq

        writer = pq.ParquetWriter(path, table.schema)
    with writer:
        for batch in table.to_batches(max_chunksize=_EXPORT_BATCH_ROWS):
            writer.write_batch(batch)
            progress(batch.num_rows)


def _csv_ready(table: pa.Table) -> pa.Table:
    """CSV has no dictionaries or time zones: keys and hosts as text, time as ISO 8601 UTC."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for field, column in zip(table.schema, table.columns):
        if pa.types.is_dictionary(field.type):
            column = column.cast(pa.string())
        elif field.name == TIME:
            column = pc.strftime(column, format="%Y-%m-%dT%H:%M:%SZ")
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names)


def _key_list(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise argparse.ArgumentTypeError("give at least one key, e.g. --keys loss,accuracy")
    return keys


__all__ = ["main"]
