"""Frameworks' hyperparameter objects as expman parameters.

`Experiment.log_parameters` takes scalars, lists and nested dicts with str keys, and
config.yaml keeps the nesting (readers show nested keys as "a.b"). Frameworks hand over
Namespaces, AttributeDicts, dataclasses, enums, paths, tensors and classes; this turns
them into that shape, keeping the nesting, so one odd value never loses the whole call.
Whatever has no natural form becomes text: a class or function its qualified name, any
other object its str().
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import types
from collections.abc import Mapping
from typing import Any

MAX_ARRAY_ITEMS = 1000  # bigger arrays and tensors become a short description, not a list
_MAX_DEPTH = 30


def to_params(params: Any) -> dict[str, Any]:
    """A dict, an argparse.Namespace (or any Mapping, dataclass or SimpleNamespace) as parameters."""
    value = to_param(params)
    if not isinstance(value, dict):
        raise TypeError(f"hyperparameters must be a dict or an argparse.Namespace, got {type(params).__name__}")
    return value


def to_param(value: Any, _depth: int = 0) -> Any:
    """One value in the form config.yaml keeps (see the module docstring)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if _depth > _MAX_DEPTH:
        return str(value)
    if isinstance(value, enum.Enum):
        return to_param(value.value, _depth + 1)
    if isinstance(value, Mapping):
        return {str(k): to_param(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (argparse.Namespace, types.SimpleNamespace)):
        return {k: to_param(v, _depth + 1) for k, v in vars(value).items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_param(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [to_param(v, _depth + 1) for v in items]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and hasattr(value, "shape"):  # numpy arrays and scalars, torch tensors
        count = 1
        for dim in tuple(value.shape):
            count *= int(dim)
        if count <= MAX_ARRAY_ITEMS:
            return to_param(value.tolist(), _depth + 1)
        return f"{type(value).__name__}(shape={list(value.shape)}, dtype={getattr(value, 'dtype', '?')})"
    if isinstance(value, type) or isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return f"{value.__module__}.{value.__qualname__}"
    return str(value)
