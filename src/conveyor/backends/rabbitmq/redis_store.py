"""The Redis task store: the Redis backend's keys plus a ``publishing`` index and tickets.

Each ticket operation is one Lua script in ``rabbitmq/lua`` that includes the Redis
backend's ``_common.lua``, so records, indexes, history and retention stay exactly the
Redis backend's. The extra key ``conveyor:{q}:publishing`` (a ZSET id -> publish deadline)
shares the queue's hash tag, so the scripts still run on Redis Cluster; ``clear()`` deletes
it with the rest.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from importlib import resources
from typing import Any, cast

from ..base import Claimed, NewTask
from ..redis import _INCLUDE, RedisBackend
from .store import Staged, TaskStore, Ticket, TicketClaim, Unclaimed

_OWN_SCRIPTS = (
    "stage", "published", "due", "claim_ticket", "ack_claim", "requeue", "restage",
)  # fmt: skip


def _load_own(name: str) -> str:
    """One of our scripts, its ``-- @include`` lines read from our folder or the Redis
    backend's (``_common.lua``)."""
    own = resources.files("conveyor.backends.rabbitmq") / "lua"
    shared = resources.files("conveyor.backends") / "redis_lua"

    def include(match: Any) -> str:
        name = match.group(1)
        folder = own if (own / name).is_file() else shared
        return str((folder / name).read_text(encoding="utf-8"))

    return _INCLUDE.sub(include, (own / f"{name}.lua").read_text(encoding="utf-8"))


def _claim_args(claim: TicketClaim) -> tuple[Any, ...]:
    """ARGV of a ticket claim, in claim_ticket.lua's order after the queue's own values."""
    lease = "" if claim.lease_seconds is None else claim.lease_seconds
    return (
        claim.task_id, str(claim.number), claim.copy, "1" if claim.redelivered else "0", lease,
        claim.max_deliveries, uuid.uuid4().hex, claim.consumer,
    )  # fmt: skip


def _claimed(task_id: str, reply: list[Any]) -> Claimed | Unclaimed:
    """A claim_ticket reply: {0} (drop), {0, 'missing'}, or the claimed task's fields."""
    if int(reply[0]) == 0:
        return Unclaimed.MISSING if reply[1:] == ["missing"] else Unclaimed.DROP
    _, token, attempts, priority, data, type_, retries, backoff, limit, created, steps = reply
    return Claimed(
        task_id=task_id, token=token, attempts=int(attempts), priority=priority,
        data_json=data, type=type_ or None, max_retries=retries or None,
        retry_backoff=backoff or None, process_timeout=limit or None,
        created_at=created or None, steps_json=steps or None,
    )  # fmt: skip


def _priority(value: Any) -> int:
    try:
        return max(0, min(int(value), 255))
    except (TypeError, ValueError):
        return 0


class RedisTaskStore(RedisBackend, TaskStore):
    """Task records of one RabbitMQ queue in Redis."""

    def __init__(self, url: str, queue_name: str, **options: Any) -> None:
        super().__init__(url, queue_name, **options)
        publishing = f"conveyor:{{{queue_name}}}:publishing"
        # Every script (the Redis backend's too) now gets the 12th key; theirs ignore it.
        head = (len(self._keys) + 1, *self._keys, publishing, queue_name, self._ttl)
        self._call_head = cast(Any, head)
        for name in _OWN_SCRIPTS:
            self._source[name] = _load_own(name)
        with self._translate():
            self._load_scripts()

    def stage(
        self, tasks: Sequence[NewTask], grace: float, confirmed: Sequence[Ticket] = ()
    ) -> Staged:
        args: list[Any] = [grace, len(confirmed)]
        for ticket in confirmed:
            args += (ticket.task_id, str(ticket.number))
        for task in tasks:
            args += (
                task.task_id, task.priority, task.data_json, task.type or "", task.delay,
                "" if task.max_retries is None else task.max_retries,
                "" if task.retry_backoff is None else task.retry_backoff,
                "" if task.queue_timeout is None else task.queue_timeout,
                "" if task.process_timeout is None else task.process_timeout,
            )  # fmt: skip
        reply = self._run("stage", *args)
        tickets = [
            Ticket(task.task_id, int(number), task.priority)
            for task, number in zip(tasks, reply, strict=True)
            if int(number) > 0
        ]
        return Staged([int(number) != 0 for number in reply], tickets)

    def published(self, tickets: Sequence[Ticket]) -> None:
        args: list[Any] = []
        for ticket in tickets:
            args += (ticket.task_id, str(ticket.number))
        self._run("published", *args)

    def due(self, limit: int, grace: float) -> tuple[list[Ticket], float | None]:
        reply = self._run("due", limit, grace)
        hint = float(reply[0])
        found = [
            Ticket(str(reply[i]), int(reply[i + 1]), _priority(reply[i + 2]))
            for i in range(1, len(reply), 3)
        ]
        return found, None if hint < 0 else hint

    def claim_ticket(self, claim: TicketClaim) -> Claimed | Unclaimed:
        return _claimed(claim.task_id, self._run("claim_ticket", *_claim_args(claim)))

    def ack_and_claim_ticket(
        self, task_id: str, token: str, result_json: str | None, claim: TicketClaim
    ) -> tuple[bool, Claimed | Unclaimed]:
        acked, reply = self._run(
            "ack_claim", task_id, token, result_json or "", *_claim_args(claim)
        )
        return bool(acked), _claimed(claim.task_id, reply)

    def requeue(
        self, task_id: str, token: str, delay: float, error_json: str | None, count_attempt: bool
    ) -> bool | None:
        reply = int(
            self._run(
                "requeue", task_id, token, delay, error_json or "", "1" if count_attempt else "0"
            )
        )
        return None if reply < 0 else reply == 1

    def restage(self, task_id: str, grace: float) -> Ticket | None:
        reply = self._run("restage", task_id, grace)
        if not reply:
            return None
        return Ticket(task_id, int(reply[0]), _priority(reply[1]))
