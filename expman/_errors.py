"""Exception types. Everything expman raises on purpose derives from ExpmanError."""

from __future__ import annotations


class ExpmanError(Exception):
    """Base class for expman's own errors."""


class ProtocolError(ExpmanError):
    """A frame the collector cannot read; `reason` is the short counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RunNotFoundError(ExpmanError, LookupError):
    """No run matches the path or id given to a reader."""
