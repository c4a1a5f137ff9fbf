"""Parameters as readers show them: one dotted flattening for the CLI, notebooks and the TUI."""

from __future__ import annotations

from typing import Any


def flat_params(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as dotted keys, the way readers show them:
    {"optimizer": {"lr": 1}} -> {"optimizer.lr": 1} (an empty mapping stays a value)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
