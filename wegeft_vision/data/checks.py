"""Validation helpers shared by the data modules: each error names the value or path at fault."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import MissingFileError, UserError


def require_int(value: object, name: str, minimum: int) -> None:
    """Raise UserError unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise UserError(f"{name} must be {kind}, got {value!r}")


def listing(folder: Path) -> str:
    """The entries of ``folder`` for an error message, folders marked with a trailing '/'."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names) if names else "(nothing)"


def _require(path: Path, what: str, exists: bool) -> Path:
    if not exists:
        parent = path.parent
        while not parent.is_dir() and parent != parent.parent:
            parent = parent.parent
        raise MissingFileError(f"{what} {path} does not exist; {parent} holds: {listing(parent)}")
    return path


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else MissingFileError showing what the nearest parent holds."""
    return _require(path, what, path.is_dir())


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else MissingFileError showing what the nearest parent holds."""
    return _require(path, what, path.is_file())


def optional_int(value: Optional[int], name: str, minimum: int) -> Optional[int]:
    """``value`` unchanged if None or a valid int (see ``require_int``)."""
    if value is not None:
        require_int(value, name, minimum)
    return value
