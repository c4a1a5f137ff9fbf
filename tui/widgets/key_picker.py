"""KeyPicker: a fuzzy filter over metric keys and a multi-select list (space toggles a key)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, SelectionList
from textual.widgets.selection_list import Selection

from ..fuzzy import filter_keys


class KeyPicker(Vertical):
    DEFAULT_CSS = """
    KeyPicker { width: 30; height: 1fr; border-right: solid $primary-background; }
    KeyPicker Input { margin: 0; }
    KeyPicker SelectionList { height: 1fr; border: none; padding: 0; }
    """

    class Changed(Message):
        """The chosen keys changed (in the order they were chosen)."""

        def __init__(self, picker: KeyPicker, keys: list[str]) -> None:
            super().__init__()
            self.picker = picker
            self.keys = keys

    def __init__(self, *, id: str | None = None, leave_to: str | None = None) -> None:
        super().__init__(id=id)
        self.leave_to = leave_to  # a selector: where focus goes after enter in the filter (the charts)
        self.keys: list[str] = []
        self.chosen: list[str] = []
        self._syncing = False

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter keys (fuzzy)", id="key-filter")
        yield SelectionList[str](id="key-list")

    def set_keys(self, keys: list[str], chosen: list[str] | None = None) -> None:
        """New key list (keeps the choice); `chosen` replaces the choice without a Changed message."""
        if chosen is not None:
            self.chosen = [k for k in chosen if k in keys]
        if keys == self.keys and chosen is None:
            return
        self.keys = list(keys)
        self._fill()

    def _fill(self) -> None:
        query = self.query_one("#key-filter", Input).value
        listing = self.query_one("#key-list", SelectionList)
        self._syncing = True
        try:
            highlighted = listing.highlighted
            listing.clear_options()
            listing.add_options([Selection(k, k, k in self.chosen) for k in filter_keys(query, self.keys)])
            if listing.option_count:
                listing.highlighted = min(highlighted or 0, listing.option_count - 1)
        finally:
            self._syncing = False

    @on(Input.Changed, "#key-filter")
    def _filter(self, event: Input.Changed) -> None:
        event.stop()
        self._fill()

    @on(Input.Submitted, "#key-filter")
    def _submit(self, event: Input.Submitted) -> None:
        """Enter in the filter: choose the best match alone, and go to the charts (so the screen's
        keys, 1-6 and the chart keys, work at once), or to the list when there is nowhere else."""
        event.stop()
        matches = filter_keys(event.value, self.keys)
        if matches:
            self.choose([matches[0]])
        target = self.screen.query(self.leave_to) if self.leave_to else None
        (target.first() if target else self.query_one("#key-list", SelectionList)).focus()

    @on(SelectionList.SelectedChanged, "#key-list")
    def _toggled(self, event: SelectionList.SelectedChanged) -> None:
        event.stop()
        if self._syncing:
            return
        visible = set(event.selection_list.selected)
        shown = {str(event.selection_list.get_option_at_index(i).value) for i in range(event.selection_list.option_count)}
        kept = [k for k in self.chosen if k not in shown or k in visible]
        added = [k for k in event.selection_list.selected if k not in kept]
        self.chosen = kept + added
        self.post_message(self.Changed(self, list(self.chosen)))

    def choose(self, keys: list[str]) -> None:
        self.chosen = [k for k in keys if k in self.keys]
        self._fill()
        self.post_message(self.Changed(self, list(self.chosen)))

    def focus_filter(self) -> None:
        self.query_one("#key-filter", Input).focus()
