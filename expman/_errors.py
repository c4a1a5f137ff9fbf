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


class ArtifactError(ExpmanError):
    """An artifact could not be logged, found or read."""


class ArtifactNameError(ArtifactError, ValueError):
    """An artifact name that is not a clean relative path (absolute, `..`, NUL, ...)."""


class ArtifactIntegrityError(ArtifactError):
    """A stored artifact failed its checks: modified, truncated, extended or corrupted."""


class ArtifactKeyError(ArtifactError):
    """The master key is missing, unreadable, or not the one an artifact was encrypted with."""
