"""Decode a backend's stored row into a :class:`TaskRecord`.

Backends store raw values (Redis hands back strings); this is the one place that turns them
into typed records, tolerating rows damaged by hand so ``get_task`` never crashes on them.
"""

from __future__ import annotations

import json
from typing import Any

from .lifecycle import LEGACY_EVENTS, effective_status
from .models import TaskError, TaskEvent, TaskRecord, TaskStatus, from_timestamp


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _float(value: Any) -> float | None:
    text = _text(value)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _int(value: Any, default: int | None = 0) -> int | None:
    number = _float(value)
    return default if number is None else int(number)


def _json(value: Any) -> Any:
    text = _text(value)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text  # damaged JSON is shown as the raw text rather than hidden


def _error(value: Any) -> TaskError | None:
    decoded = _json(value)
    if decoded is None:
        return None
    if isinstance(decoded, dict):
        return TaskError(
            type=str(decoded.get("type", "Error")),
            message=str(decoded.get("message", "")),
            traceback=decoded.get("traceback"),
        )
    return TaskError(type="Error", message=str(decoded))


def _history(value: Any) -> list[TaskEvent]:
    events: list[TaskEvent] = []
    for line in (_text(value) or "").splitlines():
        try:
            raw = json.loads(line)
            events.append(
                TaskEvent(
                    at=from_timestamp(float(raw["at"])),  # type: ignore[arg-type]
                    event=str(LEGACY_EVENTS.get(raw["event"], raw["event"])),
                    attempt=int(raw.get("attempt") or 0),
                    note=raw.get("note"),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue  # one damaged line must not hide the rest of the history
    return events


def _steps(value: Any) -> dict[str, Any]:
    decoded = _json(value)
    return decoded if isinstance(decoded, dict) else {}


def _status(value: Any) -> TaskStatus:
    try:
        return TaskStatus(_text(value) or "")
    except ValueError:
        return TaskStatus.FAILED


def record_from_row(row: dict[str, Any], queue: str, now: float | None = None) -> TaskRecord:
    """Build the typed record of one stored row (see ``backends.base.ROW_FIELDS``).

    With ``now``, a waiting task past its queue_timeout shows as ``timeout`` already (see
    ``lifecycle.effective_status``): no worker may be running to sweep it.
    """
    created = _float(row.get("created_at")) or 0.0
    status = _text(row.get("status")) or ""
    if now is not None:
        status = effective_status(status, _float(row.get("expire_at")), now)
    return TaskRecord(
        id=_text(row.get("id")) or "",
        queue=_text(row.get("queue")) or queue,
        type=_text(row.get("type")),
        priority=_int(row.get("priority")) or 0,
        data=_json(row.get("data")),
        status=_status(status),
        attempts=_int(row.get("attempts")) or 0,
        max_retries=_int(row.get("max_retries"), None),
        retry_backoff=_float(row.get("retry_backoff")),
        queue_timeout=_float(row.get("queue_timeout")),
        process_timeout=_float(row.get("process_timeout")),
        created_at=from_timestamp(created),  # type: ignore[arg-type]
        scheduled_for=from_timestamp(_float(row.get("scheduled_for"))),
        started_at=from_timestamp(_float(row.get("started_at"))),
        finished_at=from_timestamp(_float(row.get("finished_at"))),
        updated_at=from_timestamp(_float(row.get("updated_at"))),
        progress=_float(row.get("progress")) or 0.0,
        progress_message=_text(row.get("progress_message")),
        result=_json(row.get("result")),
        error=_error(row.get("error")),
        dead_reason=_text(row.get("dead_reason")),
        cancel_requested=bool(_int(row.get("cancel_requested"))),
        steps=_steps(row.get("steps")),
        worker=_text(row.get("worker")),
        history=_history(row.get("history")),
    )
