"""The help screen: every key of the app and of the screen underneath, from their bindings."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static

SCREENS_TEXT = """\
Runs     every run under the root, newest first; enter opens one, space marks runs to compare;
         / filters by words and by lr=0.001, loss<0.5, optimizer.name!=sgd, tag:x; o sorts (or click a header)
Run      1 charts · 2 ranks · 3 hardware · 4 params · 5 log (follows new lines) · 6 artifacts
Compare  the marked runs overlaid (mean over ranks) and the parameters that differ
Charts   a grid of the chosen keys, ] [ pages; s smoothing, l log y, r robust y, + - zoom x, < > pan, 0 reset
         n selects a series (rank or run; drawn on top), h hides it, o shows it alone, a shows all
Mouse    click rows, tabs and keys; the wheel on a chart zooms x; click a legend entry to select, again to hide"""

KEY_NAMES = {"slash": "/", "question_mark": "?", "escape": "esc", "space": "space", "enter": "enter",
             "plus": "+", "equals_sign": "=", "minus": "-", "less_than_sign": "<", "comma": ",",
             "greater_than_sign": ">", "full_stop": ".", "right_square_bracket": "]", "left_square_bracket": "["}


def key_label(binding: Binding) -> str:
    return ", ".join(KEY_NAMES.get(k, k) for k in binding.key.split(","))


def bindings_of(owner: object) -> list[Binding]:
    out = []
    for item in getattr(owner, "BINDINGS", []):
        out.append(item if isinstance(item, Binding) else Binding(*item))
    return out


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close help")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 96; max-width: 100%; height: auto; max-height: 90%;
                                  border: round $accent; background: $surface; padding: 0 1; }
    """

    def __init__(self, under: Screen | None, app_bindings: list[Binding]) -> None:
        super().__init__()
        self.under = under
        self.app_bindings = app_bindings
        self.rows: list[tuple[str, str]] = []  # (key, what it does), as shown

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(self._content(), id="help-text")

    def _content(self) -> Table:
        table = Table(box=None, show_header=False, pad_edge=False, expand=True)
        table.add_column("key", style="bold cyan", no_wrap=True, width=12)
        table.add_column("action")
        table.add_row(Text("expman-tui", style="bold"), "keys (esc or ? closes this)")
        sections = [(type(self.under).__name__.replace("Screen", "") if self.under else "", bindings_of(self.under)),
                    ("Everywhere", self.app_bindings)]
        for title, bindings in sections:
            if not bindings:
                continue
            table.add_row("", "")
            table.add_row(Text(title, style="bold underline"), "")
            for binding in bindings:
                self.rows.append((key_label(binding), binding.description or binding.action))
                table.add_row(*self.rows[-1])
        table.add_row("", "")
        table.add_row(Text("Screens", style="bold underline"), "")
        for line in SCREENS_TEXT.splitlines():
            head, _, rest = line.partition(" ")
            table.add_row(head, rest.strip())
        return table

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.app.pop_screen()
