"""One queue's transitions on Redis: each call is one Lua script (see ``lua/``).

A task is always in exactly one index — pending, delayed, leases, pulled or a done set —
and never only in a worker's memory. A blocked reserve waits on ``BLPOP`` of a wake-up list
that every push appends to, bounded by how long until a delayed task is due, a lease
expires or a waiting task times out, so it wakes within a round trip of a push without
polling.

With ``durability`` (``replicas=N``), a push and a settle that finishes a try (ack, nack,
fail) wait until N replicas hold the write (``RedisClient.run_durable``). A push that
fewer replicas confirmed in time raises ``ReplicationError`` (the task *is* stored on the
master; pushing it again is safe, as a live id is not stored twice); a settle only warns,
because losing it in a failover makes the task run again, never lost.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from loguru import logger

from ...errors import ReplicationError
from ...lifecycle import Op
from ..base import (
    Claimed,
    ClaimResult,
    ClaimSpec,
    Enqueued,
    Head,
    LeaseState,
    NewTask,
    Outcome,
    Preempt,
    QueueStore,
    Settled,
    StoreConfig,
    Ticket,
)
from .client import RedisClient
from .doorbell import WakeBell
from .keys import QueueKeys

#: The keyspace layout this code writes; ``migrate.lua`` brings older ones up to it.
LAYOUT = 2
_MIGRATE_SLICE = 1000
#: Settles that finish a try: with ``durability`` they wait for the replicas.
_FINISHING = frozenset({Op.ACK, Op.NACK, Op.FAIL})
#: At most one "too few replicas" warning per this many seconds per process.
_WARN_EVERY = 10.0
_last_warning = [0.0]


def _opt(value: Any) -> Any:
    return "" if value is None else value


def _priority(value: Any) -> int:
    """The AMQP priority of a stored priority (damaged values publish as 0)."""
    try:
        return max(0, min(int(value), 255))
    except (TypeError, ValueError):
        return 0


def spec_args(spec: ClaimSpec) -> list[Any]:
    """A claim spec as ARGV, in read_spec's order (``_lifecycle.lua``)."""
    ticket = spec.ticket
    count = 1 if ticket is not None else max(1, spec.count)
    return [
        _opt(spec.lease), spec.max_deliveries, spec.consumer, _opt(spec.min_priority),
        ticket.task_id if ticket else "", ticket.number if ticket else "",
        ticket.copy if ticket else "", "1" if ticket and ticket.redelivered else "0",
        *(uuid.uuid4().hex for _ in range(count)),
    ]  # fmt: skip


def claim_result(reply: list[Any]) -> ClaimResult:
    """Parse claim()'s reply: {wait_hint, unclaimed, skipped, 11 values per task...}."""
    hint_text, unclaimed, skipped = reply[0], reply[1], reply[2]
    claimed = []
    for i in range(3, len(reply), 11):
        task_id, token, attempts, priority, data, type_, retries, backoff, limit, created, steps = (
            reply[i : i + 11]
        )
        claimed.append(
            Claimed(
                task_id=task_id,
                token=token,
                attempts=int(attempts),
                priority=priority,
                data_json=data,
                type=type_ or None,
                max_retries=retries or None,
                retry_backoff=backoff or None,
                process_timeout=limit or None,
                created_at=created or None,
                steps_json=steps or None,
            )
        )
    hint = float(hint_text) if hint_text not in ("", None) else -1.0
    return ClaimResult(claimed, None if hint < 0 else hint, unclaimed or None, skipped == "1")


class RedisStore(QueueStore):
    """The transitions of one queue, on a server's shared client."""

    has_doorbell = True

    def __init__(self, client: RedisClient, queue_name: str, config: StoreConfig) -> None:
        self.queue_name = queue_name
        self._client = client
        # The client drops its kept connection at fork; redis-py's Cluster client holds
        # locks (slot map, initialisation) that another thread may hold at the fork.
        self.settles_in_child = client.cluster is None
        self.keys = QueueKeys.for_queue(queue_name)
        mode = "broker" if config.broker_leases else ""
        if config.aging_interval is not None and not config.broker_leases:
            mode = f"aging:{config.aging_interval!r}"  # see AGING in _lifecycle.lua
        self._max_deliveries = config.max_deliveries
        self._head = (queue_name, str(config.result_ttl), mode, str(config.publish_grace))
        self._bell: WakeBell | None = None
        self._migrate()

    def _run(self, name: str, *args: Any) -> Any:
        return self._client.run(name, self.keys.all, (*self._head, *args))

    def _run_durable(self, name: str, *args: Any) -> tuple[Any, int | None]:
        """A write that waits for ``durability``'s replicas: the reply, and how many
        replicas confirmed it (None when no durability is asked for)."""
        if self._client.durability is None:
            return self._run(name, *args), None
        return self._client.run_durable(name, self.keys.all, (*self._head, *args))

    def _migrate(self) -> None:
        """Bring a queue an earlier version wrote up to LAYOUT, in slices (once per queue)."""
        version = self._client.on_master(self.keys.pending, lambda r: r.get(self.keys.layout))
        if version is not None and int(version) >= LAYOUT:
            return
        for index in ("pending", "delayed"):
            start = 0
            while self._run("migrate", index, start, _MIGRATE_SLICE, "") == _MIGRATE_SLICE:
                start += _MIGRATE_SLICE
        self._run("migrate", "pending", 0, 0, str(LAYOUT))

    # -- transitions ------------------------------------------------------------------------

    def enqueue(self, tasks: Sequence[NewTask]) -> Enqueued:
        args: list[Any] = []
        for task in tasks:
            args += (
                task.task_id, task.priority, task.data_json, task.type or "", task.delay,
                _opt(task.max_retries), _opt(task.retry_backoff), _opt(task.queue_timeout),
                _opt(task.process_timeout), _opt(task.concurrency_key),
                _opt(task.max_concurrency), "1" if task.unique else "",
            )  # fmt: skip
        reply, acked = self._run_durable("enqueue", *args) if tasks else ([], None)
        if acked is not None and self._client.durability is not None:
            wanted = self._client.durability
            if acked < wanted.replicas:
                raise ReplicationError(
                    f"push: Redis at {self._client.safe_url} stored {len(tasks)} task(s) on "
                    f"the master, but only {acked} of {wanted.replicas} replica(s) confirmed "
                    f"within {wanted.timeout:g}s (durability {wanted}); a failover now could "
                    "lose them. Pushing again is safe (a live id is not stored twice); "
                    "check that the replicas are connected (INFO replication)"
                )
        tickets = [
            Ticket(task.task_id, int(number), task.priority)
            for task, number in zip(tasks, reply, strict=True)
            if int(number) > 0
        ]
        return Enqueued([int(number) != 0 for number in reply], tickets)

    def claim(self, spec: ClaimSpec) -> ClaimResult:
        return claim_result(self._run("claim", *spec_args(spec)))

    def settle(
        self, outcomes: Sequence[Outcome], then: ClaimSpec | None = None
    ) -> tuple[list[Settled], ClaimResult | None]:
        args: list[Any] = [len(outcomes)]
        for outcome in outcomes:
            extra: Any = outcome.status.value
            if outcome.op is Op.PROGRESS:
                extra = outcome.fraction
            args += (
                outcome.op.value, outcome.task_id, outcome.token or "", outcome.payload or "",
                outcome.delay, outcome.reason or "", extra,
            )  # fmt: skip
        if then is not None:
            args += spec_args(then)
        if any(outcome.op in _FINISHING for outcome in outcomes):
            reply, acked = self._run_durable("settle", *args)
            self._check_replicas(acked, len(outcomes))
        else:
            reply = self._run("settle", *args)
        flat = reply[0]
        settled = []
        for outcome, i in zip(outcomes, range(0, len(flat), 2), strict=True):
            status, ticket = flat[i] or None, flat[i + 1]
            number = int(ticket) if ticket not in ("", None) else None
            settled.append(
                Settled(
                    status,
                    Ticket(outcome.task_id, number, 0) if number else None,
                )
            )
        claimed = claim_result(reply[1]) if then is not None else None
        return self._with_priorities(settled), claimed

    def head(self) -> Head | None:
        reply = self._run("head")
        if not reply:
            return None
        try:
            return Head(str(reply[0]), int(reply[1]), float(reply[2] or 0.0))
        except (TypeError, ValueError):
            return None  # a damaged head: the next claim dead-letters it

    def preempt(self, yielded: Preempt, spec: ClaimSpec) -> tuple[Settled, ClaimResult]:
        reply = self._run(
            "preempt", yielded.task_id, yielded.token, yielded.steps_json or "",
            yielded.min_priority, yielded.max_preemptions, *spec_args(replace(spec, count=1)),
        )  # fmt: skip
        if not reply or not reply[0]:
            return Settled(None), ClaimResult([])
        return Settled(str(reply[0])), claim_result(reply[1])

    def _check_replicas(self, acked: int | None, count: int) -> None:
        wanted = self._client.durability
        if acked is None or wanted is None or acked >= wanted.replicas:
            return
        now = time.monotonic()
        if now - _last_warning[0] >= _WARN_EVERY:
            _last_warning[0] = now
            logger.warning(
                "Redis at {}: only {} of {} replica(s) confirmed a settle of {} task(s) within "
                "{:g}s; a failover now could run them again. Check the replicas (INFO "
                "replication); each such write waits the whole timeout",
                self._client.safe_url, acked, wanted.replicas, count, wanted.timeout,
            )  # fmt: skip

    def _with_priorities(self, settled: list[Settled]) -> list[Settled]:
        """A new ticket carries its task's priority (for the broker message property)."""
        if not any(item.ticket for item in settled):
            return settled

        def read(redis: Any) -> list[Any]:
            pipe = redis.pipeline(transaction=False)
            for item in settled:
                if item.ticket is not None:
                    pipe.hget(self.keys.task(item.ticket.task_id), "priority")
            return list(pipe.execute())

        priorities = iter(self._client.on_master(self.keys.pending, read))
        return [
            Settled(
                item.status,
                Ticket(item.ticket.task_id, item.ticket.number, _priority(next(priorities))),
            )
            if item.ticket is not None
            else item
            for item in settled
        ]

    def renew(self, leases: Sequence[tuple[str, str]], seconds: float | None) -> list[LeaseState]:
        if not leases:
            return []
        args: list[Any] = [_opt(seconds)]
        for task_id, token in leases:
            args += (task_id, token)
        return [LeaseState(int(flag) > 0, int(flag) == 2) for flag in self._run("renew", *args)]

    def cancel(self, task_id: str) -> bool:
        return bool(self._run("cancel", task_id))

    def retry(self, task_id: str) -> Ticket | None:
        reply = self._run("retry", task_id)
        if not reply:
            return None
        return Ticket(task_id, int(reply[0]), _priority(reply[1]))

    def due(self, limit: int) -> tuple[list[Ticket], float | None]:
        reply = self._run("due", limit)
        hint = float(reply[0])
        found = [
            Ticket(str(reply[i]), int(reply[i + 1]), _priority(reply[i + 2]))
            for i in range(1, len(reply), 3)
        ]
        return found, None if hint < 0 else hint

    def published(self, tickets: Sequence[Ticket]) -> None:
        args: list[Any] = []
        for ticket in tickets:
            args += (ticket.task_id, str(ticket.number))
        if args:
            self._run("published", *args)

    def sweep(self) -> None:
        self._run("sweep", self._max_deliveries)

    def purge(self) -> int:
        """SCAN for the queue's keys on the master that holds its slot (on a cluster, the
        only node that can have them) and unlink them in batches. The counters stay, since
        they never go down (/metrics); the event stream goes with the tasks (a reader resuming
        from an id before the purge gets a ``reset``: event numbers continue from the
        counters)."""
        kept = {self.keys.counters}

        def purge_on(node: Any) -> int:
            pending = int(node.zcard(self.keys.pending))
            batch: list[str] = []
            for key in node.scan_iter(match=self.keys.pattern, count=1000):
                if key in kept:
                    continue
                batch.append(key)
                if len(batch) >= 1000:
                    node.unlink(*batch)
                    batch.clear()
            if batch:
                node.unlink(*batch)
            return pending

        return self._client.on_master(self.keys.pending, purge_on)

    def purge_finished(self, status: str, limit: int) -> int:
        return int(self._run("purge", status, limit))

    def wait(self, timeout: float) -> None:
        seconds = min(max(timeout, 0.001), self._client.max_block)
        if self._bell is not None and self._bell.asked:
            # The doorbell's BLPOP blocked first, so Redis hands it the next marker: a
            # second BLPOP here would sleep through that push.
            self._bell.wait(seconds)
            return
        self._client.on_master(self.keys.pending, lambda r: r.blpop([self.keys.wake], seconds))

    def doorbell(self, seconds: float) -> int | None:
        if self._bell is None:
            self._bell = WakeBell(self._client, self.keys.pending, self.keys.wake)
        return self._bell.arm(seconds)

    def heard_doorbell(self) -> None:
        if self._bell is not None:
            self._bell.heard()

    def withdraw_doorbell(self) -> None:
        if self._bell is not None:
            self._bell.withdraw()

    def close(self) -> None:
        if self._bell is not None:
            self._bell.close()
            self._bell = None
