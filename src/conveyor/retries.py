"""Retry schedules and permanent errors: what a step's failure means for its next try.

``retry_backoff`` is either a number (the first delay, doubling each retry, capped by
``worker.max_backoff`` and jittered) or a list of delays (``[60, 300, 900]``): retry *n*
waits the *n*-th entry, and retries past the end repeat the last one. A list is explicit,
so it is used as written (no doubling, no jitter, no cap). A list travels and is stored as
its JSON text in the task's ``retry_backoff`` field, so every backend keeps it unchanged.

A step that raises :class:`PermanentError` (or a subclass) fails its task at once, without
retries, as does an exception a step's ``dont_retry_on`` lists or its ``retry_on`` does not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from .errors import TaskTypeError, TaskValidationError
from .validation import check_seconds, decode_json

#: A retry schedule: a base delay, or the list of delays.
Backoff = float | tuple[float, ...]
MAX_BACKOFF_ENTRIES = 100


class PermanentError(Exception):
    """Raise it from a step for a failure no retry can fix: the task is dead-lettered at
    once (``dead_reason`` ``permanent``), whatever tries it has left."""


def check_backoff(field: str, value: object) -> Backoff | None:
    """A number of seconds, or a non-empty list of them; None when unset."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        if not 1 <= len(value) <= MAX_BACKOFF_ENTRIES:
            raise TaskValidationError(
                field,
                f"a list of delays needs 1 to {MAX_BACKOFF_ENTRIES} entries, got {len(value)}",
            )
        delays = tuple(check_seconds(f"{field}[{i}]", entry) for i, entry in enumerate(value))
        return tuple(float(delay or 0.0) for delay in delays)
    seconds = check_seconds(field, value)
    return None if seconds is None else float(seconds)


def encode_backoff(value: Backoff | None) -> float | str | None:
    """What a store keeps: the number, or a list's JSON text."""
    if isinstance(value, tuple):
        return json.dumps(list(value), separators=(",", ":"))
    return value


def decode_backoff(value: Any) -> Backoff | None:
    """A stored ``retry_backoff`` back to a schedule; raises ValueError when damaged."""
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes) and value.strip()[:1] in ("[", b"["):
        # A list of numbers nests one level: anything deeper is damage, refused without
        # recursing (a stored value nested thousands deep must not crash a reader).
        entries = decode_json("retry_backoff", value, max_depth=1, strict=True)
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"retry_backoff {value!r} is not a list of delays")
        if not all(
            isinstance(entry, int | float) and not isinstance(entry, bool) for entry in entries
        ):
            raise ValueError(f"retry_backoff {value!r} holds an entry that is not a number")
        delays = tuple(float(entry) for entry in entries)
        if not all(math.isfinite(d) and d >= 0 for d in delays):
            raise ValueError(f"retry_backoff {value!r} holds a delay that is not seconds >= 0")
        return delays
    if isinstance(value, bool):
        raise TypeError("retry_backoff is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def listed_delay(delays: Sequence[float], attempt: int) -> float:
    """The delay before retry number ``attempt`` (1-based): past the end, the last entry."""
    return float(delays[min(max(attempt, 1), len(delays)) - 1])


def is_permanent(
    exc: BaseException,
    retry_on: tuple[type[BaseException], ...] | None,
    dont_retry_on: tuple[type[BaseException], ...] | None,
) -> bool:
    """Does this exception end the task at once, whatever tries it has left?"""
    if isinstance(exc, PermanentError):
        return True
    if dont_retry_on and isinstance(exc, dont_retry_on):
        return True
    return bool(retry_on) and not isinstance(exc, retry_on or ())


def exception_types(field: str, value: object) -> tuple[type[BaseException], ...] | None:
    """``retry_on``/``dont_retry_on``: an exception class or a list of them."""
    if value is None:
        return None
    items = tuple(value) if isinstance(value, list | tuple) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TaskTypeError(field, f"must be exception classes, got {item!r}")
    return items
