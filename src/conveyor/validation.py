"""Checks a producer's input before anything is written, so a rejected push leaves no trace.

These run on every push, so they stay plain functions (no model construction): the push
path's budget is one broker round trip and a ``json.dumps``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import ConfigError, TaskTypeError, TaskValidationError

MAX_TASK_ID_LENGTH = 200
_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def check_task_id(task_id: object) -> str:
    """A task id is a non-empty string of at most 200 printable characters."""
    if not isinstance(task_id, str):
        raise TaskTypeError(
            "task_id", f"must be a string, got {type(task_id).__name__}; pass e.g. 'task_123'"
        )
    if not task_id or task_id.isspace():
        raise TaskValidationError("task_id", "must not be empty; omit it to get a generated id")
    if len(task_id) > MAX_TASK_ID_LENGTH:
        raise TaskValidationError(
            "task_id", f"is {len(task_id)} characters long; the limit is {MAX_TASK_ID_LENGTH}"
        )
    if not task_id.isprintable():
        raise TaskValidationError("task_id", "must not contain control characters")
    return task_id


def check_priority(priority: object, max_priority: int) -> int:
    """Priorities are integers 0..max_priority; a larger number runs first."""
    # bool is an int subclass: True would silently mean priority 1.
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TaskTypeError(
            "priority",
            f"must be an integer 0..{max_priority}, got {type(priority).__name__} {priority!r}",
        )
    if not 0 <= priority <= max_priority:
        raise TaskValidationError(
            "priority", f"must be between 0 and {max_priority} (larger runs first), got {priority}"
        )
    return priority


def encode_json(field: str, value: Any, max_bytes: int | None = None) -> str:
    """Serialize ``value`` as compact JSON, refusing what JSON cannot carry or what is too big."""
    try:
        text = _encoder.encode(value)
    except TypeError as exc:
        raise TaskTypeError(
            field, f"must be JSON-serializable (dicts, lists, str, numbers, bool, None): {exc}"
        ) from None
    except ValueError as exc:  # NaN / Infinity, circular references
        raise TaskValidationError(field, f"cannot be encoded as JSON: {exc}") from None
    if max_bytes is not None:
        size = len(text) if text.isascii() else len(text.encode())
        if size > max_bytes:
            raise TaskValidationError(
                field,
                f"is {size} bytes as JSON; the limit is {max_bytes} (max_payload_bytes). "
                "Store large inputs elsewhere and pass a reference",
            )
    return text


def check_seconds(field: str, value: object, *, allow_zero: bool = True) -> float | None:
    """Durations are non-negative finite numbers of seconds, or None for "not set"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TaskTypeError(field, f"must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if (
        math.isnan(seconds)
        or math.isinf(seconds)
        or seconds < 0
        or (seconds == 0 and not allow_zero)
    ):
        raise TaskValidationError(field, f"must be a finite number of seconds >= 0, got {value}")
    return seconds


def check_optional_count(field: str, value: object) -> int | None:
    """Counts such as ``max_retries`` are integers >= 0, or None for "use the default"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskTypeError(field, f"must be an integer >= 0, got {type(value).__name__}")
    if value < 0:
        raise TaskValidationError(field, f"must be >= 0, got {value}")
    return value


def check_type_name(value: object) -> str | None:
    """A task's ``type`` names the pipeline to run; None means the service's only one."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise TaskTypeError("type", "must be a non-empty string naming a pipeline")
    return value


def check_queue_name(value: object) -> str:
    """A queue name is a non-empty string without braces (braces would break the Redis hash
    tag that keeps a queue's keys in one slot)."""
    if not isinstance(value, str) or not value or "{" in value or "}" in value:
        raise ConfigError(f"queue_name: must be a non-empty string without braces, got {value!r}")
    return value
