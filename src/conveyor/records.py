"""Decode a backend's stored row into a :class:`TaskRecord`, whatever the row holds.

Backends store raw values (Redis hands back strings, SQLite whatever was written); this is
the one place that turns them into typed records. A row damaged by hand or by a buggy
producer must never make a read fail (a 500 on the list page, a crashed CLI): each field
that cannot be read gets a safe value and a line in ``record.damage`` saying what was wrong,
so the record is shown as damaged rather than hidden. Every value in a record can be
rendered: finite numbers, dates within years 1..9999, valid Unicode, JSON no deeper than
:data:`MAX_JSON_DEPTH`.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from .errors import TaskValidationError
from .lifecycle import LEGACY_EVENTS, Event, effective_status
from .models import TaskError, TaskEvent, TaskRecord, TaskStatus, from_timestamp
from .retries import decode_backoff
from .validation import (
    MAX_JSON_DEPTH,
    MAX_MESSAGE_CHARS,
    MAX_NAME_LENGTH,
    clip_text,
    clip_traceback,
    decode_json,
)

#: Integers outside this range are damage (a priority of 1e300), not values.
_INT_RANGE = (-(2**63), 2**63 - 1)
_EPOCH = 0.0


def record_from_row(
    row: dict[str, Any], queue: str, now: float | None = None, max_depth: int = MAX_JSON_DEPTH
) -> TaskRecord:
    """Build the typed record of one stored row (see ``backends.base.ROW_FIELDS``).

    With ``now``, a waiting task past its queue_timeout shows as ``timeout`` already (see
    ``lifecycle.effective_status``): no worker may be running to sweep it. ``max_depth``
    bounds the JSON fields; the default is the ceiling of the setting, so a read never hides
    what some producer's configuration accepted.
    """
    read = _Reader(row, max_depth)
    created = read.moment("created_at")
    history = read.history()
    return TaskRecord(
        id=read.text("id") or read.missing("id", ""),
        queue=read.text("queue") or queue,
        type=read.text("type"),
        priority=read.integer("priority", 0),
        data=read.json("data"),
        status=read.status(now),
        attempts=read.integer("attempts", 0),
        max_retries=read.optional_integer("max_retries"),
        retry_backoff=read.backoff("retry_backoff"),
        queue_timeout=read.number("queue_timeout"),
        process_timeout=read.number("process_timeout"),
        created_at=created or _epoch(),
        scheduled_for=read.moment("scheduled_for"),
        started_at=read.moment("started_at"),
        finished_at=read.moment("finished_at"),
        updated_at=read.moment("updated_at"),
        progress=read.number("progress") or 0.0,
        progress_message=read.message("progress_message"),
        result=read.json("result"),
        error=read.error(),
        dead_reason=read.message("dead_reason"),
        cancel_requested=bool(read.integer("cancel_requested", 0)),
        steps=read.steps(),
        worker=read.text("worker"),
        concurrency_key=read.text("concurrency_key"),
        max_concurrency=read.optional_integer("max_concurrency"),
        history=history,
        # Counted from the history: every backend keeps it, so no row field is added.
        preemptions=sum(1 for event in history if event.event == Event.PREEMPTED),
        damage=read.damage,
    )


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str | bytes) and not value)


def _epoch() -> datetime:
    moment = from_timestamp(_EPOCH)
    assert moment is not None
    return moment


class _Reader:
    """Reads one row's fields, noting each that is damaged."""

    def __init__(self, row: dict[str, Any], max_depth: int) -> None:
        self.row = row
        self.max_depth = max_depth
        self.damage: list[str] = []

    def note(self, field: str, why: str) -> None:
        self.damage.append(f"{field}: {why}")

    def missing(self, field: str, fallback: str) -> str:
        self.note(field, "missing")
        return fallback

    # -- scalars ------------------------------------------------------------------------------

    def text(self, field: str, limit: int = MAX_NAME_LENGTH * 4) -> str | None:
        """A text field as valid Unicode; invalid bytes are shown escaped (``\\xff``)."""
        value = self.row.get(field)
        if _unset(value):
            return None
        if isinstance(value, bytes):
            try:
                text = value.decode()
            except UnicodeDecodeError:
                self.note(field, "not valid UTF-8 (shown escaped)")
                text = value.decode("utf-8", "backslashreplace")
        elif isinstance(value, str):
            text = value
        else:
            text = str(value) if isinstance(value, int | float) else repr(value)
        if not text.isascii():
            text = self._valid_unicode(field, text)
        return clip_text(text, limit)

    def message(self, field: str) -> str | None:
        return self.text(field, MAX_MESSAGE_CHARS)

    def _valid_unicode(self, field: str, text: str) -> str:
        try:
            text.encode()
            return text
        except UnicodeEncodeError:
            pass
        self.note(field, "not valid UTF-8 (shown escaped)")
        try:  # Redis hands invalid bytes back as surrogate escapes: show the bytes
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode()

    def number(self, field: str) -> float | None:
        """A finite float, or None when unset or damaged."""
        value = self.row.get(field)
        if _unset(value):
            return None
        try:
            if isinstance(value, bool):
                raise TypeError
            number = float(value if isinstance(value, int | float) else self._raw_text(value))
        except (TypeError, ValueError, OverflowError):
            self.note(field, f"{self._shown(value)} is not a number")
            return None
        if not math.isfinite(number):
            self.note(field, f"{self._shown(value)} is not a finite number")
            return None
        return number

    def backoff(self, field: str) -> float | tuple[float, ...] | None:
        """A retry schedule: a number, or a list of delays stored as JSON text."""
        value = self.row.get(field)
        if isinstance(value, str | bytes) and value.strip()[:1] in ("[", b"["):
            try:
                return decode_backoff(value)
            except (ValueError, TypeError) as exc:
                self.note(field, str(exc))
                return None
        return self.number(field)

    def optional_integer(self, field: str) -> int | None:
        number = self.number(field)
        if number is None:
            return None
        if not _INT_RANGE[0] <= number <= _INT_RANGE[1]:
            self.note(field, f"{self._shown(self.row.get(field))} is out of range")
            return None
        return int(number)

    def integer(self, field: str, default: int) -> int:
        number = self.optional_integer(field)
        return default if number is None else number

    def moment(self, field: str) -> datetime | None:
        number = self.number(field)
        if number is None:
            return None
        moment = from_timestamp(number)
        if moment is None:
            self.note(field, f"{number!r} is not a time between the years 1 and 9999")
        return moment

    def status(self, now: float | None) -> TaskStatus:
        text = self.text("status")
        if now is not None:
            text = effective_status(text or "", self.number("expire_at"), now)
        try:
            return TaskStatus(text or "")
        except ValueError:
            self.note("status", f"{text!r} is not a status (shown as failed)")
            return TaskStatus.FAILED

    # -- JSON ---------------------------------------------------------------------------------

    def json(self, field: str, depth: int | None = None) -> Any:
        """The decoded JSON; damaged JSON is shown as its (cut) raw text, never hidden."""
        value = self.row.get(field)
        if _unset(value):
            return None
        raw = value if isinstance(value, str | bytes) else str(value)
        try:
            return decode_json(field, raw, depth or self.max_depth, strict=True)
        except TaskValidationError as exc:
            self.note(field, exc.reason)
            return self.text(field, MAX_MESSAGE_CHARS)

    def error(self) -> TaskError | None:
        decoded = self.json("error")
        if decoded is None:
            return None
        if not isinstance(decoded, dict):
            return TaskError(type="Error", message=clip_text(str(decoded)))
        kind, message = decoded.get("type", "Error"), decoded.get("message", "")
        trace = decoded.get("traceback")
        if not (isinstance(kind, str) and isinstance(message, str)) or not isinstance(
            trace, str | None
        ):
            self.note("error", "type, message and traceback are not all text (shown as text)")
        return TaskError(
            type=clip_text(str(kind), MAX_NAME_LENGTH),
            message=clip_text(str(message)),
            traceback=None if trace is None else clip_traceback(str(trace)),
        )

    def steps(self) -> dict[str, Any]:
        decoded = self.json("steps", self.max_depth + 1)
        if decoded is None or isinstance(decoded, dict):
            return decoded or {}
        if not any(line.startswith("steps:") for line in self.damage):
            self.note("steps", f"is a {type(decoded).__name__}, not an object")
        return {}

    def history(self) -> list[TaskEvent]:
        events: list[TaskEvent] = []
        damaged = 0
        for line in (self.text("history", 10**9) or "").splitlines():
            event = _event(line, self.max_depth)
            if event is None:
                damaged += 1  # one damaged line must not hide the rest of the history
            else:
                events.append(event)
        if damaged:
            self.note("history", f"{damaged} damaged line(s) left out")
        return events

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _raw_text(value: Any) -> str:
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return value if isinstance(value, str) else str(value)

    @staticmethod
    def _shown(value: Any) -> str:
        """A stored value in a damage note: short, escaped, valid Unicode."""
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:60] + "…"
        return shown.encode("utf-8", "backslashreplace").decode()


def _event(line: str, max_depth: int) -> TaskEvent | None:
    """One history line, or None when it is damaged in any way."""
    try:
        raw = decode_json("history", line, max_depth, strict=True)
    except TaskValidationError:
        return None
    if not isinstance(raw, dict):
        return None
    at, event, attempt, note = (raw.get(k) for k in ("at", "event", "attempt", "note"))
    moment = from_timestamp(_finite(at))
    attempts = _finite(0 if attempt is None else attempt)
    if moment is None or not isinstance(event, str) or attempts is None:
        return None
    if not _INT_RANGE[0] <= attempts <= _INT_RANGE[1]:
        return None
    return TaskEvent(
        at=moment,
        event=clip_text(str(LEGACY_EVENTS.get(event, event)), MAX_NAME_LENGTH),
        attempt=int(attempts),
        note=None if note is None else clip_text(str(note)),
    )


def _finite(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (text, bool, 1e400...)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
