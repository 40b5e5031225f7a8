"""Checks on everything that enters Conveyor, so what is accepted can always be stored, read
back, listed and rendered, and a rejected push leaves no trace.

One policy for JSON (task data, step results and checkpoints, results, worker heartbeats):
at most ``max_payload_bytes`` of UTF-8 and at most ``max_json_depth`` nested containers
(``queue.max_json_depth``, default 64, never above :data:`MAX_JSON_DEPTH`). The depth cap is
what keeps reading safe: pydantic refuses to serialize values nested about 255 deep (the
API would answer 500) and Python's JSON codecs raise ``RecursionError`` near 1000 (a worker
would crash). Error texts and progress notes are bounded by length and cut with a marker,
never refused: a failure must always be recordable.

These run on every push, so they stay plain functions: the common case costs one C-level
``json.dumps`` and two ``str.count`` calls; the tree is walked only when the text holds more
brackets than the depth limit.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import TaskTypeError, TaskValidationError

MAX_TASK_ID_LENGTH = 200
#: Longest queue name, task type or worker id.
MAX_NAME_LENGTH = 200
#: The default and the ceiling of ``queue.max_json_depth``. Records add a few levels around
#: a payload (list page, record, steps), which stays far below pydantic's 255.
DEFAULT_JSON_DEPTH = 64
MAX_JSON_DEPTH = 128
#: Error messages and progress notes are cut to this many characters, tracebacks to the
#: other (keeping their start and their end, where the exception is).
MAX_MESSAGE_CHARS = 4000
MAX_TRACEBACK_CHARS = 32000
#: The longest delay, eta, timeout or backoff: 10 years. A due time past the year 9999
#: cannot be shown as a date.
MAX_SECONDS = 10 * 365 * 24 * 3600
#: The largest count (``max_retries``): fits a 32-bit integer, a SQLite INTEGER, a Lua number.
MAX_COUNT = 2**31 - 1
#: Ids that no URL can carry: browsers and most HTTP clients remove "." and ".." path
#: segments (also written %2e), so such a task could be pushed but never addressed.
_DOT_SEGMENTS = frozenset({".", ".."})

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


# -- names ------------------------------------------------------------------------------------


def check_task_id(task_id: object) -> str:
    """A task id: 1..200 printable characters (no control characters), not "." or ".."."""
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
    if task_id in _DOT_SEGMENTS:
        raise TaskValidationError(
            "task_id", f"must not be {task_id!r}: no URL can name it (it is a path segment)"
        )
    return task_id


def check_name(field: str, value: object) -> str:
    """A name (task type, worker id): 1..200 printable characters, not only spaces."""
    if not isinstance(value, str):
        raise TaskTypeError(field, f"must be a string, got {type(value).__name__}")
    if not value or value.isspace():
        raise TaskValidationError(field, "must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise TaskValidationError(
            field, f"is {len(value)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    if not value.isprintable():
        raise TaskValidationError(field, f"must not contain control characters, got {value!r}")
    return value


def check_queue_name(value: object, field: str = "queue_name") -> str:
    """A queue name: a name without whitespace or braces (braces are Redis hash tags)."""
    name = check_name(field, value)
    if any(ch in "{}" or ch.isspace() for ch in name):
        raise TaskValidationError(field, f"must not contain spaces or braces, got {name!r}")
    return name


def check_type_name(value: object) -> str | None:
    """A task's ``type`` names the pipeline to run; None means the service's only one."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise TaskTypeError("type", "must be a non-empty string naming a pipeline")
    return check_name("type", value)


# -- numbers ----------------------------------------------------------------------------------


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


def check_seconds(
    field: str, value: object, *, allow_zero: bool = True, maximum: float = MAX_SECONDS
) -> float | None:
    """Durations are finite numbers of seconds 0..``maximum`` (10 years), or None (not set)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TaskTypeError(field, f"must be a number of seconds, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond float range
        seconds = math.inf
    if not 0 <= seconds <= maximum or (seconds == 0 and not allow_zero):
        at_most = "" if maximum == math.inf else f" and at most {maximum:g}"
        if maximum == MAX_SECONDS:
            at_most += " (10 years)"
        low = ">= 0" if allow_zero else "> 0"
        raise TaskValidationError(
            field, f"must be a finite number of seconds {low}{at_most}, got {value}"
        )
    return seconds


def check_optional_count(field: str, value: object) -> int | None:
    """Counts such as ``max_retries`` are integers 0..2^31-1, or None for "use the default"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskTypeError(field, f"must be an integer >= 0, got {type(value).__name__}")
    if not 0 <= value <= MAX_COUNT:
        raise TaskValidationError(field, f"must be between 0 and {MAX_COUNT}, got {value}")
    return value


# -- JSON -------------------------------------------------------------------------------------


def encode_json(
    field: str,
    value: Any,
    max_bytes: int | None = None,
    max_depth: int = DEFAULT_JSON_DEPTH,
) -> str:
    """Serialize ``value`` as compact JSON, refusing what JSON cannot carry (NaN, objects,
    invalid Unicode), what is nested deeper than ``max_depth`` or larger than ``max_bytes``.
    """
    try:
        text = _encoder.encode(value)
    except TypeError as exc:
        raise TaskTypeError(
            field, f"must be JSON-serializable (dicts, lists, str, numbers, bool, None): {exc}"
        ) from None
    except RecursionError:
        raise _too_deep(field, None, max_depth) from None
    except ValueError as exc:  # NaN / Infinity, circular references
        raise TaskValidationError(field, f"cannot be encoded as JSON: {exc}") from None
    check_depth(field, value, max_depth, text)
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode())
        except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 byte sequence exists
            raise TaskValidationError(
                field, f"contains invalid Unicode ({exc.reason}); strings must be valid text"
            ) from None
    if max_bytes is not None and size > max_bytes:
        raise TaskValidationError(
            field,
            f"is {size} bytes as JSON; the limit is {max_bytes} (max_payload_bytes). "
            "Store large inputs elsewhere and pass a reference",
        )
    return text


def decode_json(
    field: str, text: str | bytes, max_depth: int = DEFAULT_JSON_DEPTH, *, strict: bool = False
) -> Any:
    """Parse JSON read from storage or a user, never raising ``RecursionError``.

    Raises ``TaskValidationError`` (a ``ValueError``) for invalid JSON or nesting deeper
    than ``max_depth``. ``strict`` also refuses what could not be written back (NaN,
    Infinity, invalid Unicode): read paths use it so a record can always be rendered.
    """
    try:
        value = json.loads(text, parse_constant=_refuse_constant) if strict else json.loads(text)
    except RecursionError:
        raise _too_deep(field, None, max_depth) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the constant hook
        raise TaskValidationError(field, f"is not valid JSON: {exc}") from None
    check_depth(field, value, max_depth, text)
    if strict:
        encode_json(field, value, max_depth=max_depth)  # inf from 1e400, lone surrogates
    return value


def check_depth(field: str, value: Any, max_depth: int, text: str | bytes | None = None) -> None:
    """Raise when ``value`` nests more than ``max_depth`` containers (``[]`` is depth 1).

    With ``text`` (the value's JSON), values with no more brackets than the limit are not
    walked at all: they cannot be deeper than the brackets they have.
    """
    if isinstance(text, bytes) and text.count(b"[") + text.count(b"{") <= max_depth:
        return
    if isinstance(text, str) and text.count("[") + text.count("{") <= max_depth:
        return
    if not isinstance(value, dict | list | tuple):
        return
    # An explicit stack, not recursion: the point is to survive input nested 100 000 deep.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise _too_deep(field, depth, max_depth)
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))


def _too_deep(field: str, depth: int | None, max_depth: int) -> TaskValidationError:
    found = "more" if depth is None else f"{depth} levels (or more)"
    return TaskValidationError(
        field,
        f"is nested {found} deep; the limit is {max_depth} levels of lists and objects "
        "(queue.max_json_depth). Flatten it",
    )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# -- text -------------------------------------------------------------------------------------


def clip_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to about ``limit`` characters with a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more characters cut]"


def clip_traceback(text: str, limit: int = MAX_TRACEBACK_CHARS) -> str:
    """A traceback cut in the middle: its start (where it began) and its end (the innermost
    frames and the exception itself) are what a reader needs."""
    if len(text) <= limit:
        return text
    head = limit // 4
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n... [{cut} characters cut] ...\n{text[-tail:]}"
