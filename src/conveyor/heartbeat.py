"""Decode a worker's stored heartbeat into a plain, always-renderable description.

A heartbeat is JSON a worker writes every few seconds; by hand or by another version it may
be anything (a list, a number, text, NaN, invalid Unicode). The workers listing, the CLI,
``/metrics`` and the dashboard all read it through :func:`heartbeat_from`, which returns the
known keys with safe values (and ``damage`` naming what could not be read), never raises,
and never passes an unknown key on.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import TaskValidationError
from .validation import MAX_JSON_DEPTH, MAX_NAME_LENGTH, clip_text, decode_json

_TEXT = ("id", "host", "state")
_COUNTS = ("pid", "concurrency", "processed", "failed")
_TIMES = ("started_at", "last_seen")
_CURRENT = ("task_id", "queue", "type", "step")
#: The same ceiling as every read: what register_worker accepted always reads back.
_MAX_DEPTH = MAX_JSON_DEPTH
_MAX_CURRENT = 1000


def heartbeat_from(raw: Any) -> dict[str, Any]:
    """The heartbeat ``raw`` (JSON text as stored) as a dict of known keys and safe values."""
    damage: list[str] = []
    try:
        decoded = decode_json("heartbeat", _as_str(raw), _MAX_DEPTH, strict=True)
    except TaskValidationError as exc:
        decoded = None
        damage.append(f"heartbeat: {exc.reason}")
    if decoded is not None and not isinstance(decoded, dict):
        damage.append(f"heartbeat: is a {type(decoded).__name__}, not an object")
    info: dict[str, Any] = decoded if isinstance(decoded, dict) else {}
    found: dict[str, Any] = {}
    for key in _TEXT:
        found[key] = _text(info.get(key), key, damage)
    for key in _COUNTS:
        found[key] = _count(info.get(key), key, damage)
    for key in _TIMES:
        found[key] = _time(info.get(key), key, damage)
    found["processed"] = found["processed"] or 0
    found["failed"] = found["failed"] or 0
    found["queues"] = _names(info.get("queues"), damage)
    found["current"] = _current(info.get("current"), damage)
    if damage and found["state"] is None:
        found["state"] = "damaged"
    found["damage"] = damage
    return found


def _as_str(raw: Any) -> str | bytes:
    return raw if isinstance(raw, str | bytes) else str(raw)


def _text(value: Any, key: str, damage: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        damage.append(f"{key}: is a {type(value).__name__}, not text")
        return None
    return clip_text(str(value), MAX_NAME_LENGTH)


def _count(value: Any, key: str, damage: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        damage.append(f"{key}: {_shown(value)} is not a count")
        return None
    return value


def _time(value: Any, key: str, damage: list[str]) -> float | None:
    if value is None:
        return None
    if not isinstance(value, bool) and isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number) and abs(number) < 1e12:  # epoch seconds, years 1..33658
            return number
    damage.append(f"{key}: {_shown(value)} is not a time")
    return None


def _names(value: Any, damage: list[str]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        damage.append(f"queues: is a {type(value).__name__}, not a list")
        return []
    names = [_text(each, "queues", damage) for each in value[:_MAX_CURRENT]]
    return [name for name in names if name is not None]


def _current(value: Any, damage: list[str]) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        damage.append(f"current: is a {type(value).__name__}, not a list")
        return []
    tasks = []
    for each in value[:_MAX_CURRENT]:
        if not isinstance(each, dict):
            damage.append(f"current: an entry is a {type(each).__name__}, not an object")
            continue
        tasks.append({key: _text(each.get(key), f"current.{key}", damage) for key in _CURRENT})
    return tasks


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:60] + "…"
