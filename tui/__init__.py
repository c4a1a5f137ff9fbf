"""expman-tui, the live terminal UI (installed as `expman.tui`). Not built yet: issue 6."""

import sys


def main() -> int:
    print("expman-tui is not available yet: the terminal UI is still being built.\n"
          "Meanwhile use `expman ls` and `expman show RUN`.", file=sys.stderr)
    return 2
