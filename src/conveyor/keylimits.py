"""Per-key concurrency limits: what a push may ask for, validated once for every backend.

``push(..., concurrency_key="user_123", max_concurrency=5)`` (the XQueue fields) lets at
most 5 tasks of ``user_123`` be ``processing`` at once in that queue, across every worker
and host. A queue may configure limits too (``queue.key_limits``, ``"*"`` for any key); the
smallest of the task's and the configured limit is stored with the task, and among a key's
running tasks the smallest stored limit wins. The stores enforce it inside their claim
(``backends/sqlite/keylimits.py``, ``backends/redis/lua/_lifecycle.lua``).

RabbitMQ picks the message itself, so a claim cannot pass over a task there; keyed pushes
are refused on it with a message that says so (see the README).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .backends import QueueBackend
from .errors import TaskValidationError
from .validation import MAX_COUNT, check_name

#: The key in ``queue.key_limits`` that applies to every key without its own entry.
ANY_KEY = "*"


def check_limit(field: str, value: object) -> int | None:
    """A limit: an integer of at least 1, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise TaskValidationError(
            field, f"must be an integer between 1 and {MAX_COUNT}, got {value!r}"
        )
    return value


def key_fields(
    key: object, limit: object, configured: Mapping[str, int], backend: QueueBackend
) -> dict[str, Any]:
    """The ``concurrency_key``/``max_concurrency`` of a new task (empty when it has no key)."""
    wanted = check_limit("max_concurrency", limit)
    if key is None:
        if wanted is not None:
            raise TaskValidationError(
                "max_concurrency", "needs a concurrency_key (the key the limit applies to)"
            )
        return {}
    name = check_name("concurrency_key", key)
    if backend is QueueBackend.RABBITMQ:
        raise TaskValidationError(
            "concurrency_key",
            "per-key concurrency limits are not supported on the RabbitMQ backend (the "
            "broker picks each message, so a full key cannot be passed over); use Redis or "
            "SQLite for queues with keyed tasks",
        )
    limits = [x for x in (wanted, configured.get(name, configured.get(ANY_KEY))) if x]
    return {"concurrency_key": name, "max_concurrency": min(limits) if limits else None}
