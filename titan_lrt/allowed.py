"""Allowed values of a setting, declared once on its dataclass field and checked by one function.

    steps: int = setting(100, ge=1)
    packing: str = setting("bos_aligned", choices=PACKING_MODES)

`choices` is the tuple exported by the module that branches on the value; `ge`,
`gt`, `le`, `lt` bound a number. The config checks every value it sets with `problem`
(and documents it with `allowed_text`); `ModelArgs` checks its own fields the
same way. A leaf module: it imports nothing from titan_lrt.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import field
from typing import Any


def setting(
    default: Any,
    *,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with its default (the only one: builders take no defaults) and its allowed values."""
    allowed = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    return field(default=default, metadata={k: v for k, v in allowed.items() if v is not None})


def problem(value: Any, metadata) -> str | None:
    """What is wrong with `value` under a field's allowed values, as the end of a message
    that starts with "<key>=<value>"; None when it is allowed."""
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        return f"{suggest(str(value), [str(c) for c in choices])}; allowed: {', '.join(map(str, choices))}"
    ge, gt, le, lt = metadata.get("ge"), metadata.get("gt"), metadata.get("le"), metadata.get("lt")
    if ge is None and gt is None and le is None and lt is None:
        return None
    if (
        math.isfinite(value)
        and (ge is None or value >= ge)
        and (gt is None or value > gt)
        and (le is None or value <= le)
        and (lt is None or value < lt)
    ):
        return None
    return " must be " + _range_text(metadata, isinstance(value, float))


def message(key: str, value: Any, metadata) -> str | None:
    """ "<key>=<value><problem>", or None when the value is allowed."""
    wrong = problem(value, metadata)
    if wrong is None:
        return None
    shown = repr(value) if "choices" in metadata else value
    return f"{key}={shown}{wrong}"


def allowed_text(metadata) -> str:
    """The allowed values of a field, for the config reference."""
    if "choices" in metadata:
        return f"One of {', '.join(map(str, metadata['choices']))}."
    if any(k in metadata for k in ("ge", "gt", "le", "lt")):
        return f"Must be {_range_text(metadata, False)}."
    return ""


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _range_text(metadata, is_float: bool) -> str:
    ge, gt, le, lt = metadata.get("ge"), metadata.get("gt"), metadata.get("le"), metadata.get("lt")
    low = ("[", ">=", ge) if ge is not None else ("(", ">", gt) if gt is not None else None
    high = ("]", "<=", le) if le is not None else (")", "<", lt) if lt is not None else None
    if high is None:
        return ("a finite number " if is_float else "") + f"{low[1]} {low[2]}"
    if low is None:
        return f"{high[1]} {high[2]}"
    return f"in {low[0]}{low[2]}, {high[2]}{high[0]}"
