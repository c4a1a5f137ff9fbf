"""Plain-text output of the `expman` command: aligned columns."""

from __future__ import annotations

from typing import Iterable, Sequence


def aligned(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[str] = ()) -> str:
    """Columns padded to their widest cell, two spaces apart; columns named in `right` right-aligned."""
    right = set(right)
    rows = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if h in right else cell.ljust(w) for cell, w, h in zip(row, widths, headers)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
