"""A run's console (stdout and stderr of its ranks) back as a table, from its run.log.

Ranks that capture their console (expman/_rank/console.py) send each printed line as a log
line whose level is its stream, so run.log holds them as
`<time> [<host>:<rank>] STDOUT <line>`; this turns those entries into rows.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from expman._storage.layout import parse_time

if TYPE_CHECKING:
    import pyarrow as pa

_ENTRY = re.compile(r"^(\S+) \[(.*):(-?\d+)\] (STDOUT|STDERR) (.*)$", re.S)


def console_table(entries: list[str]) -> pa.Table:
    """Rows (time, host, rank, stream, line) of the run.log entries that are console lines."""
    import pyarrow as pa

    rows: dict[str, list] = {"time": [], "host": [], "rank": [], "stream": [], "line": []}
    for entry in entries:
        match = _ENTRY.match(entry.rstrip("\n"))
        if match is None:
            continue
        when, host, rank, stream, text = match.groups()
        seconds = parse_time(when)
        rows["time"].append(None if seconds is None else int(seconds * 1e6))
        rows["host"].append(host)
        rows["rank"].append(int(rank))
        rows["stream"].append(stream.lower())
        rows["line"].append(text.replace("\n    ", "\n"))  # continuation lines were indented by the collector
    schema = pa.schema([("time", pa.timestamp("us", tz="UTC")), ("host", pa.string()), ("rank", pa.int32()),
                        ("stream", pa.string()), ("line", pa.string())])
    return pa.table(rows, schema=schema)
