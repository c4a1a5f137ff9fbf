"""expman-tui, the live terminal UI (installed as `expman.tui`).

    expman-tui [ROOT]          # default: $EXPMAN_ROOT, else ./experiments
    expman-tui [ROOT] --serve  # the same app in a browser (tui/serve.py, needs expman[serve])

See tui/app.py for the shell, tui/screens/ for the screens, tui/widgets/ for the widgets
and tui/data/ for the reading (off the UI thread).
"""

from __future__ import annotations

import argparse
import os
import sys



def _port_number(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1-65535)")
    return port


def main(argv: list[str] | None = None) -> int:
    from expman._errors import ExpmanError

    from .data.runs import POLL_INTERVAL_S
    from expman._storage.files import resolve_root

    parser = argparse.ArgumentParser(prog="expman-tui", description="Watch expman runs live in the terminal.")
    parser.add_argument("root", nargs="?", default=None,
                        help="folder holding <experiment>/<run>/ (default: $EXPMAN_ROOT, else ./experiments)")
    parser.add_argument("--poll", type=float, default=POLL_INTERVAL_S,
                        help=f"seconds between reads of live runs (default {POLL_INTERVAL_S})")
    parser.add_argument("--keys", default=None,
                        help="comma-separated metric keys for the Runs screen columns (default: loss,val_loss,acc,accuracy,lr)")
    parser.add_argument("--serve", action="store_true",
                        help="show the app in a browser instead (needs textual-serve: pip install 'expman[serve]'); "
                             "there is no login, so anyone who can reach HOST:PORT sees the runs")
    parser.add_argument("--host", default="127.0.0.1",
                        help="with --serve: address to listen on (default 127.0.0.1, this machine only; "
                             "anything else exposes the runs to the network: prefer ssh -L 8000:localhost:8000 HOST)")
    parser.add_argument("--port", type=_port_number, default=8000, help="with --serve: port to listen on (default 8000)")
    parser.add_argument("--public-url", default=None,
                        help="with --serve: the address the browser uses, when not http://HOST:PORT "
                             "(e.g. http://localhost:9000 for ssh -L 9000:localhost:8000)")
    args = parser.parse_args(argv)
    try:
        root = resolve_root(args.root)
    except ExpmanError as exc:  # a URI: the TUI tails local folders only
        print(f"expman-tui: {exc}", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"expman-tui: {root} is not a folder (give ROOT, or set EXPMAN_ROOT)", file=sys.stderr)
        return 2

    if args.serve:
        try:
            from .serve import serve
        except ModuleNotFoundError as error:
            print(f"expman-tui: --serve needs textual-serve ({error.name} is not installed): "
                  "pip install 'expman[serve]'", file=sys.stderr)
            return 2
        return serve(root, host=args.host, port=args.port, poll=args.poll, keys=args.keys,
                     public_url=args.public_url)

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
