"""Argument checks shared by every layer, one message per kind of mistake, naming the field.

Standard library only: the pure core (``difficulty``, ``budget``, ``selection``) uses it too.
"""

from __future__ import annotations

__all__ = ["check_int"]


def check_int(value: object, name: str, *, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum`` (or None, if allowed)."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"`{name}` must be {kind}{' or None' if allow_none else ''}, got {value!r}.")
