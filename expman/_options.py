"""Command-line option values shared by `expman`, `expman-collector` and `expman-tui`.

The bottom layer, beside _env: all three programs parse with it, so a bad value gets the
same answer everywhere: one line, `PROG: error: ...`, exit status 2 (argparse's own
convention), never a traceback. Each function here is an argparse `type=` and raises
`argparse.ArgumentTypeError` with a message that names the value and what would do.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:/\[\]]+):(?P<port>[^:/]*)$")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`PROG: error: ...`, exit 2), no usage
    block; `PROG --help` still shows the full usage. Subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default where the help text does not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, argparse._VersionAction)):
            return text
        return f"{text} (default: %(default)s)"


def number(kind: Callable[[str], float] = float, *, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: an int or float within [low, high] (`low_open`: strictly above low)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value != value:  # NaN compares false with every bound
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} is too small: give {'more than' if low_open else 'at least'} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is too large: give at most {high:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid <name> value" messages
    return parse


positive_seconds = number(float, low=0.0, low_open=True)
port_number = number(int, low=1, high=65535)


def log_level(text: str) -> str:
    """DEBUG, INFO, WARNING, ERROR or CRITICAL, in any case."""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level: use one of {', '.join(LOG_LEVELS)}")
    return level


def endpoint(text: str) -> str:
    """A ZeroMQ endpoint expman speaks: ipc://PATH, or tcp://HOST:PORT (port 0-65535, or *)."""
    if text.startswith("ipc://"):
        if len(text) == len("ipc://"):
            raise argparse.ArgumentTypeError(f"{text!r}: give a socket path after ipc://, e.g. ipc:///tmp/expman.sock")
        return text
    if not text.startswith("tcp://"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an endpoint: use ipc://PATH or tcp://HOST:PORT")
    match = _HOST_PORT.match(text[len("tcp://"):])
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected tcp://HOST:PORT, e.g. tcp://0.0.0.0:5555")
    port = match.group("port")
    if port != "*" and not (port.isdigit() and int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be a number from 0 to 65535 (0 or * picks one)")
    return text


def existing_file(text: str) -> str:
    """A path to a file that exists and can be read."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file" if not path.exists() else f"{text} is not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc.strerror}") from None
    return text


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
    """Leave like an argparse error: one line on stderr, then exit `code`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


__all__ = ["LOG_LEVELS", "DefaultsFormatter", "OneLineParser", "endpoint", "existing_file", "fail", "log_level",
           "number", "port_number", "positive_seconds"]
