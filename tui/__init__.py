"""expman-tui, the live terminal UI (installed as `expman.tui`).

    expman-tui [ROOT]          # default: $EXPMAN_ROOT, else ./experiments
    expman-tui s3://bucket/prefix   # runs in a bucket (credentials: AWS_* environment)
    expman-tui [ROOT] --serve  # the same app in a browser (tui/serve.py, needs expman[serve])

See tui/app.py for the shell, tui/screens/ for the screens, tui/widgets/ for the widgets
and tui/data/ for the reading (off the UI thread).
"""

from __future__ import annotations

import argparse
import os
import sys



def _parser() -> argparse.ArgumentParser:
    from expman._options import DefaultsFormatter, OneLineParser, number, port_number
    from expman._version import __version__

    from .data.runs import DEFAULT_KEY_METRICS
    from .data.store import BUCKET_POLL_S, LOCAL_POLL_S

    parser = OneLineParser(prog="expman-tui", formatter_class=DefaultsFormatter,
                           description="Watch expman runs live in the terminal.")
    parser.add_argument("--version", action="version", version=f"expman-tui {__version__}")
    parser.add_argument("root", nargs="?", default=None, metavar="ROOT",
                        help="folder holding <experiment>/<run>/, or a bucket URI such as s3://bucket/prefix "
                             "(default: $EXPMAN_ROOT, else ./experiments)")
    parser.add_argument("--poll", type=number(float, low=0.01, high=3600), default=None, metavar="SECONDS",
                        help=f"seconds between reads of live runs (default: {LOCAL_POLL_S} on a folder, "
                             f"{BUCKET_POLL_S:g} on a bucket, where each read is a few requests)")
    parser.add_argument("--keys", default=None, type=_key_list, metavar="KEY,KEY",
                        help="comma-separated metric keys for the Runs screen columns "
                             f"(default: {','.join(DEFAULT_KEY_METRICS)})")
    parser.add_argument("--serve", action="store_true",
                        help="show the app in a browser instead (needs textual-serve: pip install 'expman[serve]'); "
                             "there is no login, so anyone who can reach HOST:PORT sees the runs")
    parser.add_argument("--host", default="127.0.0.1",
                        help="with --serve: address to listen on (default 127.0.0.1, this machine only; "
                             "anything else exposes the runs to the network: prefer ssh -L 8000:localhost:8000 HOST)")
    parser.add_argument("--port", type=port_number, default=8000, help="with --serve: port to listen on")
    parser.add_argument("--public-url", default=None, metavar="URL",
                        help="with --serve: the address the browser uses, when not http://HOST:PORT "
                             "(e.g. http://localhost:9000 for ssh -L 9000:localhost:8000)")
    return parser


def _key_list(text: str) -> str:
    if not any(k.strip() for k in text.split(",")):
        raise argparse.ArgumentTypeError("give at least one key, e.g. --keys loss,acc")
    return text


def main(argv: list[str] | None = None) -> int:
    from expman._env import chosen_root
    from expman._errors import ExpmanError

    from .data.store import Store

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        store = Store.open(args.root)
        found = store.exists()
    except (ExpmanError, OSError) as exc:  # a URI pyarrow cannot open, a bucket that cannot be reached
        print(f"expman-tui: error: {exc}", file=sys.stderr)
        return 2
    if not found:
        where = store.label if store.remote else store.root
        print(f"expman-tui: error: {where} is not a folder (give ROOT, or set EXPMAN_ROOT)", file=sys.stderr)
        return 2
    root = os.fspath(chosen_root(args.root)) if store.remote else store.root  # for --serve's app processes
    poll = args.poll if args.poll is not None else store.poll_interval

    if args.serve:
        try:
            from .serve import serve
        except ModuleNotFoundError as error:
            print(f"expman-tui: --serve needs textual-serve ({error.name} is not installed): "
                  "pip install 'expman[serve]'", file=sys.stderr)
            return 2
        return serve(root, host=args.host, port=args.port, poll=poll, keys=args.keys,
                     public_url=args.public_url)

    from .app import ExpmanApp
    from .data.runs import DEFAULT_KEY_METRICS
    from .widgets.terminal_graphics import detect

    detect()  # before Textual starts reading the terminal: images in its graphics protocol where it has one

    keys = tuple(k.strip() for k in args.keys.split(",") if k.strip()) if args.keys else DEFAULT_KEY_METRICS
    app = ExpmanApp(store, poll_interval=poll, key_metrics=keys)
    app.run()
    code = app.return_code or 0
    # Quitting is instant: the terminal is restored; a reader thread still decoding a big
    # part would only hold the process open. The TUI writes nothing, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["main"]
