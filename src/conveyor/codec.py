"""Encoding and decoding at the manager's edge: delays, errors, and claimed raw values.

Plain functions, shared by every backend through ``QueueManager``: what a producer passes
(a delay, an exception) becomes the stored text, and what a backend hands back (strings
from Redis, loose SQLite values) becomes typed values or a ``TypeError``/``ValueError``
that dead-letters the entry as malformed.
"""

from __future__ import annotations

import math
import time
import traceback as traceback_module
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .errors import TaskValidationError
from .models import TaskError
from .validation import (
    DEFAULT_JSON_DEPTH,
    MAX_NAME_LENGTH,
    MAX_SECONDS,
    check_seconds,
    clip_text,
    clip_traceback,
    decode_json,
    encode_json,
)

#: The longest delay (or eta from now) a task may have: 10 years.
MAX_DELAY = MAX_SECONDS

ErrorLike = BaseException | TaskError | Mapping[str, Any] | str | None


def delay_from(delay: Any, eta: Any) -> float:
    if delay is not None and eta is not None:
        raise ValueError("delay/eta: give one of them, not both")
    if eta is not None:
        if isinstance(eta, datetime):
            if eta.tzinfo is None:
                raise ValueError("eta: must be timezone-aware, e.g. datetime.now(UTC) + ...")
            eta = eta.timestamp()
        at = check_seconds("eta", eta, maximum=math.inf)  # a time, not a duration
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
    """The stored form of an error: ``{"type", "message", "traceback"}``, always storable.

    A failure must never be refused for its text: long texts are cut (with a marker) and
    anything that is not text (or not valid Unicode) is shown as text.
    """
    if error is None:
        return None
    if isinstance(error, BaseException):
        kind: Any = type(error).__name__
        message: Any = error
        trace: Any = "".join(traceback_module.format_exception(error))
    elif isinstance(error, TaskError):
        kind, message, trace = error.type, error.message, error.traceback
    elif isinstance(error, str):
        kind, message, trace = "Error", error, None
    else:
        kind, message = error.get("type", "Error"), error.get("message", "")
        trace = error.get("traceback")
    payload = {
        "type": clip_text(_as_text(kind), MAX_NAME_LENGTH),
        "message": clip_text(_as_text(message)),
        "traceback": None if trace is None else clip_traceback(_as_text(trace)),
    }
    return encode_json("error", payload)


def note_text(note: Any) -> str | None:
    """A progress note as stored: text (or None), cut to the message limit."""
    return None if note is None else clip_text(_as_text(note))


def _as_text(value: Any) -> str:
    """Any value as valid Unicode text (a lone surrogate has no UTF-8 form: escaped)."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = str(value)
        except Exception as exc:  # a broken __str__ must not lose the failure
            text = f"<unprintable {type(value).__name__}: {type(exc).__name__}>"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode()
    return text


def strict_int(value: Any) -> int:
    text = value.decode() if isinstance(value, bytes) else value
    number = int(text) if isinstance(text, str) else text
    if isinstance(number, bool) or not isinstance(number, int):
        raise TypeError(f"priority is {type(value).__name__} {value!r}, not an integer")
    return number


def steps_from(value: Any, max_depth: int = DEFAULT_JSON_DEPTH) -> dict[str, Any]:
    """Checkpointed step results: an object of step name -> result (one level more)."""
    if value is None or value == "":
        return {}
    steps = decode_json("steps", value, max_depth + 1)
    if not isinstance(steps, dict):
        raise TypeError(f"steps is {type(steps).__name__}, not an object")
    return steps


def optional_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number
