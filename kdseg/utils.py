"""Small helpers shared by tracking, resuming, the teacher cache and sweeps (a leaf module)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Generator
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

E = TypeVar("E", bound=Enum)
R = TypeVar("R")


NOT_SETTINGS = ("loss.search",)
"""Config nodes that are not settings of a run (a loss option's tuning search space): neither part
of a run's fingerprint nor logged as params (:func:`is_setting`)."""


def is_setting(key: str) -> bool:
    """Whether a flattened config key is a setting of the run (not in :data:`NOT_SETTINGS`)."""
    return not any(key == node or key.startswith(f"{node}.") for node in NOT_SETTINGS)


def drain(steps: Generator[Any, None, R]) -> R:
    """Run a generator to its end; returns its return value (``return x`` inside it)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out |= flatten(value, name) if isinstance(value, dict) and value else {name: value}
    return out


def choice(options: type[E], value: Any, key: str) -> E:
    """``value`` as a member of the Enum ``options``, or a ValueError naming ``key`` and the valid values.

    For functions that take a config choice as an argument: the valid values are the Enum's,
    defined once (the config schema checks config values against the same Enum).
    """
    try:
        return options(value)
    except ValueError:
        raise ValueError(f"{key} must be one of {', '.join(str(m.value) for m in options)}, got '{value}'") from None


def not_a_folder(path: str | os.PathLike) -> str:
    """Why ``path`` is not a folder, for a message: ``does not exist`` or ``is a file, not a folder``."""
    return "is a file, not a folder" if Path(path).exists() else "does not exist"


def not_a_file(path: str | os.PathLike) -> str:
    """Why ``path`` is not a regular file, for a message: ``does not exist`` or ``is a folder, not a file``."""
    path = Path(path)
    if path.is_dir():
        return "is a folder, not a file"
    return "is not a regular file" if path.exists() else "does not exist"


def not_a_folder_to_be(path: str | os.PathLike) -> str | None:
    """Why ``mkdir -p path`` cannot give a folder, for a message (``is a file``, ``lies under the file '...'``);
    None when ``path`` is a folder or can be created as one."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            if candidate.is_dir():
                return None
            return "is a file" if candidate == Path(path) else f"lies under the file '{candidate}'"
    return None


def digest(content: Any, chars: int) -> str:
    """The first ``chars`` hex digits of the SHA-256 of ``content`` as sorted JSON (non-JSON values as ``str``)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:chars]
