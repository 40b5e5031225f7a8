"""Aging against starvation: a waiting task's effective priority rises one level every
``aging_interval`` seconds, so a steady stream of urgent work cannot starve old tasks.

It costs nothing at claim time: with aging on, a task's place in line is the static score
``ready_at - priority * aging_interval`` (earlier is sooner), written once when the task
enters the line. No score is ever rewritten, a claim stays one index seek (SQLite) or one
``ZRANGE`` (Redis), and order stays FIFO among tasks of the same effective priority.

The cap: effective priority is not capped. A task of priority ``p`` waits at most
``(q - p) * aging_interval`` seconds behind fresh tasks of priority ``q``, plus the work
that was already ahead of it; that bound is the point. Reserved slots and preemption look
at declared priority only, so aging never lets an old low-priority task take a slot kept
for urgent work.

RabbitMQ orders messages itself (by AMQP priority only): aging is refused there.
"""

from __future__ import annotations

from .backends.table import QueueBackend
from .errors import ConfigError


def check_aging(kind: QueueBackend, interval: float | None) -> float | None:
    """The validated ``aging_interval`` (None: aging off), or a ConfigError that says what
    to do."""
    if interval is None:
        return None
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise ConfigError(
            f"queue.aging_interval: must be a number of seconds > 0 (or unset for no aging), "
            f"got {interval!r}"
        )
    if kind is QueueBackend.RABBITMQ:
        raise ConfigError(
            "queue.aging_interval: aging needs a place in line the backend controls, and "
            "RabbitMQ orders messages by AMQP priority only; unset aging_interval, or use the "
            "SQLite or Redis backend for this queue"
        )
    return float(interval)
