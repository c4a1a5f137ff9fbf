"""expman-tui, the live terminal UI (installed as `expman.tui`).

    expman-tui [ROOT]          # default: $EXPMAN_ROOT, else ./experiments

See tui/app.py for the shell, tui/screens/ for the screens, tui/widgets/ for the widgets
and tui/data/ for the reading (off the UI thread).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from expman._errors import ExpmanError
    from expman._identity import resolve_root

    parser = argparse.ArgumentParser(prog="expman-tui", description="Watch expman runs live in the terminal.")
    parser.add_argument("root", nargs="?", default=None,
                        help="folder holding <experiment>/<run>/ (default: $EXPMAN_ROOT, else ./experiments)")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between reads of live runs (default 0.5)")
    parser.add_argument("--keys", default=None,
                        help="comma-separated metric keys for the Runs screen columns (default: loss,val_loss,acc,accuracy,lr)")
    args = parser.parse_args(argv)
    try:
        root = resolve_root(args.root)
    except ExpmanError as exc:  # a URI: the TUI tails local folders only
        print(f"expman-tui: {exc}", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"expman-tui: {root} is not a folder (give ROOT, or set EXPMAN_ROOT)", file=sys.stderr)
        return 2

    from .app import ExpmanApp
    from .data.runs import DEFAULT_KEY_METRICS

    keys = tuple(k.strip() for k in args.keys.split(",") if k.strip()) if args.keys else DEFAULT_KEY_METRICS
    app = ExpmanApp(args.root or root, poll_interval=args.poll, key_metrics=keys)
    app.run()
    code = app.return_code or 0
    # Quitting is instant: the terminal is restored; a reader thread still decoding a big
    # part would only hold the process open. The TUI writes nothing, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["main"]
