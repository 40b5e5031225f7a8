"""Outcomes of a held task, built and checked without being sent.

``QueueManager.ack``/``nack``/``fail``/``checkpoint``/``set_progress`` build one of these
and send it at once; a worker builds the same values into its outbox, which sends them in
one round trip per queue, or later, when the backend answers again after an outage. One
place builds them, so both paths encode and validate alike (each builder raises
``TaskValidationError``/``TaskTypeError`` naming the bad field before anything is sent).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .backends import Outcome
from .codec import ErrorLike, error_json, note_text, within_max_delay
from .lifecycle import Op, TaskStatus
from .models import Message
from .validation import check_seconds, encode_json

#: Outcomes that end a delivery: at most one per held task is ever sent.
FINAL_OPS = frozenset({Op.ACK, Op.NACK, Op.HAND_BACK, Op.FAIL})


def ack(message: Message, result: Any, max_bytes: int, max_depth: int) -> Outcome:
    """Finish as ``success`` with ``result`` (None: no result stored)."""
    return ack_lease(message.task_id, message.token, result, max_bytes, max_depth)


def ack_lease(task_id: str, token: str, result: Any, max_bytes: int, max_depth: int) -> Outcome:
    """``ack`` for a lease known by its id and token only (a child holds no ``Message``)."""
    payload = None if result is None else encode_json("result", result, max_bytes, max_depth)
    return Outcome(Op.ACK, task_id, token, payload)


def nack(
    message: Message, delay: float = 0, *, error: ErrorLike = None, count_attempt: bool = True
) -> Outcome:
    """Back in line after ``delay`` seconds; ``count_attempt=False`` returns the try too."""
    seconds = within_max_delay("delay", check_seconds("delay", delay) or 0.0)
    op = Op.NACK if count_attempt else Op.HAND_BACK
    return Outcome(op, message.task_id, message.token, error_json(error), delay=seconds)


def fail(
    task_id: str, token: str | None, *, reason: str, error: ErrorLike = None,
    canceled: bool = False,
) -> Outcome:  # fmt: skip
    """Dead-letter as ``failed`` with ``reason`` (or end as ``canceled``); ``token`` None
    acts whatever the task's state."""
    status = TaskStatus.CANCELED if canceled else TaskStatus.FAILED
    return Outcome(Op.FAIL, task_id, token, error_json(error), reason=reason, status=status)


def checkpoint(
    message: Message, steps: Mapping[str, Any], max_bytes: int, max_depth: int
) -> Outcome:
    """Store finished steps' results, so a retry resumes after them."""
    # One level more than a result: the object that holds the results by step name.
    steps_json = encode_json("steps", dict(steps), max_bytes, max_depth + 1)
    return Outcome(Op.CHECKPOINT, message.task_id, message.token, steps_json)


def progress(message: Message, fraction: float, note: str | None = None) -> Outcome:
    """Progress 0..1 of a running task, with an optional note."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0 <= fraction <= 1
    ):
        raise ValueError(f"fraction: must be a number between 0 and 1, got {fraction!r}")
    payload = note_text(note)
    return Outcome(Op.PROGRESS, message.task_id, message.token, payload, fraction=float(fraction))
