"""Argument checks whose errors name the argument, its value and what is allowed (one helper per kind of check).

Every message reads ``"{where}{name}={value!r} is invalid; allowed: {allowed}"``: ``where`` names the place the
value came from (``"folora config: "``, ``"DeepSpeed config: "``), so a user finds the line to fix.
"""

from __future__ import annotations

import math
from typing import Any


def is_integer(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require(condition: bool, name: str, value: Any, allowed: str, *, where: str = "") -> None:
    """Raise ValueError naming ``name``, ``value`` and ``allowed`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{where}{name}={value!r} is invalid; allowed: {allowed}")


def require_int(name: str, value: Any, minimum: int = 1, *, optional: bool = False, where: str = "") -> None:
    """``value`` is an integer >= ``minimum`` (or None, when ``optional``)."""
    if optional and value is None:
        return
    require(is_integer(value) and value >= minimum, name, value,
            f"{'None or ' if optional else ''}an integer >= {minimum}", where=where)


def require_choice(name: str, value: Any, choices: tuple[str, ...], *, where: str = "") -> None:
    """``value`` is one of ``choices``."""
    require(value in choices, name, value, f"one of {', '.join(map(repr, choices))}", where=where)


def require_real(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = True,
                 high_open: bool = False, where: str = "") -> None:
    """``value`` is a finite real number in the interval from ``low`` to ``high`` (open or closed ends)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    low_bracket = "(" if low_open else "["
    high_bracket = ")" if high_open or high == math.inf else "]"
    require(ok, name, value, f"a finite number in {low_bracket}{low}, {high}{high_bracket}", where=where)
