"""Encoding and decoding at the manager's edge: delays, errors, and claimed raw values.

Plain functions, shared by every backend through ``QueueManager``: what a producer passes
(a delay, an exception) becomes the stored text, and what a backend hands back (strings
from Redis, loose SQLite values) becomes typed values or a ``TypeError``/``ValueError``
that dead-letters the entry as malformed.
"""

from __future__ import annotations

import json
import time
import traceback as traceback_module
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .errors import TaskValidationError
from .models import TaskError
from .validation import check_seconds, encode_json

#: The longest delay (or eta from now) a task may have: 10 years.
MAX_DELAY = 10 * 365 * 24 * 3600

ErrorLike = BaseException | TaskError | Mapping[str, Any] | str | None


def delay_from(delay: Any, eta: Any) -> float:
    if delay is not None and eta is not None:
        raise ValueError("delay/eta: give one of them, not both")
    if eta is not None:
        if isinstance(eta, datetime):
            if eta.tzinfo is None:
                raise ValueError("eta: must be timezone-aware, e.g. datetime.now(UTC) + ...")
            eta = eta.timestamp()
        at = check_seconds("eta", eta)
        return within_max_delay("eta", max(0.0, (at or 0.0) - time.time()))
    return within_max_delay("delay", check_seconds("delay", delay) or 0.0)


def within_max_delay(field: str, seconds: float) -> float:
    """A due time past the year 9999 cannot be shown as a date: refuse absurd delays."""
    if seconds > MAX_DELAY:
        raise TaskValidationError(
            field, f"is {seconds:.0f} s away; the limit is {MAX_DELAY} s (10 years)"
        )
    return seconds


def error_json(error: ErrorLike) -> str | None:
    if error is None:
        return None
    payload: dict[str, Any]
    if isinstance(error, BaseException):
        payload = {
            "type": type(error).__name__,
            "message": str(error),
            "traceback": "".join(traceback_module.format_exception(error)),
        }
    elif isinstance(error, TaskError):
        payload = error.model_dump()
    elif isinstance(error, str):
        payload = {"type": "Error", "message": error, "traceback": None}
    else:
        payload = {
            "type": str(error.get("type", "Error")),
            "message": str(error.get("message", "")),
            "traceback": error.get("traceback"),
        }
    return encode_json("error", payload)


def strict_int(value: Any) -> int:
    text = value.decode() if isinstance(value, bytes) else value
    number = int(text) if isinstance(text, str) else text
    if isinstance(number, bool) or not isinstance(number, int):
        raise TypeError(f"priority is {type(value).__name__} {value!r}, not an integer")
    return number


def steps_from(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    steps = json.loads(value)
    if not isinstance(steps, dict):
        raise TypeError(f"steps is {type(steps).__name__}, not an object")
    return steps


def optional_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    return float(value)
