"""``RabbitMQBackend``: RabbitMQ orders and delivers, the task store remembers.

See the package docstring for the design; this module maps each Backend primitive onto a
broker step and a store step, always in the order that keeps "nothing lost":

* push: store first (the record, with a publish deadline), publish, then clear the
  deadline. A crash in between leaves a record a consumer republishes; never a message
  without a record that nobody would honour.
* settle (ack, nack, fail): store first, then the broker. A crash in between leaves the
  delivery unacked; the broker redelivers it and the store drops it (finished) — never a
  broker ack for a task the store still thinks is running.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence

from loguru import logger

from ...errors import ConfigError, TaskValidationError
from ..base import Claimed, ClaimResult, NewTask
from .calls import Delivery, Outgoing
from .delegate import StoreDelegate
from .link import Link
from .store import (
    PUBLISH_GRACE,
    TaskStore,
    Ticket,
    TicketClaim,
    Unclaimed,
    default_task_store,
    open_store,
)
from .topology import Topology, parse_url

_MAX_SKIPS = 500  # dropped tickets skipped per claim before yielding to the caller
_DUE_RECHECK = 0.25  # seconds between looks for due scheduled tasks (per consumer)
_DUE_BATCH = 500  # scheduled tasks published per look
_MARKS_BATCH, _MARKS_AGE = 256, 1.0  # confirmed tickets noted in the store in batches


def _message(ticket: Ticket) -> Outgoing:
    """A new copy of a ticket: ``{"id", "ticket", "copy"}``, the copy unique per publish."""
    body = {"id": ticket.task_id, "ticket": ticket.number, "copy": uuid.uuid4().hex[:16]}
    return Outgoing(min(ticket.priority, 255), json.dumps(body, separators=(",", ":")).encode())


def _new_copy(message: Outgoing) -> Outgoing:
    """The same ticket as a new copy, for a publish that is tried again."""
    value = json.loads(message.body)
    return _message(Ticket(value["id"], value["ticket"], message.priority))


def _read_ticket(body: bytes) -> tuple[str, int, str] | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    task_id, number, copy = value.get("id"), value.get("ticket"), value.get("copy", "")
    if not isinstance(task_id, str) or not task_id or type(number) is not int:
        return None
    return task_id, number, copy if isinstance(copy, str) else ""


class RabbitMQBackend(StoreDelegate):
    """One Conveyor queue on RabbitMQ, with its records in a task store."""

    def __init__(
        self,
        url: str,
        queue_name: str,
        *,
        task_store: str | None = None,
        max_priority: int = 10,
        connect_timeout: float = 5.0,
        result_ttl: float = 7 * 24 * 3600,
    ) -> None:
        broker = parse_url(url)
        self.queue_name, self.safe_url = queue_name, broker.safe_url
        #: Seconds the broker lets a delivery stay unacked (the URL's ``consumer_timeout``).
        self.consumer_timeout = broker.consumer_timeout
        self.topology = Topology.for_queue(queue_name, max_priority)
        store_url = task_store or broker.task_store or default_task_store()
        self.store: TaskStore = open_store(
            store_url, queue_name, result_ttl=result_ttl, connect_timeout=connect_timeout
        )
        try:
            self.link = Link(
                broker, self.topology, connect_timeout=connect_timeout,
                name=f"conveyor {queue_name} pid {os.getpid()} {uuid.uuid4().hex[:8]}",
            )  # fmt: skip
        except BaseException:
            self.store.close()
            raise
        self._held: dict[str, tuple[str, Delivery]] = {}  # task id -> (token, its delivery)
        self._next_due_check = 0.0
        self._due_at: float | None = None
        # Confirmed tickets whose publish deadlines are not cleared in the store yet: cleared
        # with the next push's write, in batches, or within a second, instead of one more
        # write (an fsync on SQLite) per push. Lost marks only cost a duplicate message.
        self._confirmed: list[Ticket] = []
        self._confirmed_at = 0.0

    # -- producing ------------------------------------------------------------------------

    def enqueue(self, tasks: Sequence[NewTask]) -> list[bool]:
        for task in tasks:
            limit = task.process_timeout
            if limit is not None and limit > self.consumer_timeout:
                raise TaskValidationError("process_timeout", self._limit_text(limit, task.task_id))
        confirmed, self._confirmed = self._confirmed, []
        staged = self.store.stage(tasks, PUBLISH_GRACE, confirmed)
        if staged.tickets:
            self._publish(staged.tickets)
        if any(task.delay > 0 for task in tasks):
            self._next_due_check = 0.0
        return staged.stored

    def check_time_limit(self, seconds: float | None, what: str) -> None:
        """Refuse a hard time limit the broker would cut short (RELIABILITY.md); warn when
        there is none, since a run past ``consumer_timeout`` is delivered a second time."""
        if seconds is not None and seconds > self.consumer_timeout:
            raise ConfigError(f"{what}: {self._limit_text(seconds, None)}")
        if seconds is None:
            logger.warning(
                "{} has no hard time limit: on RabbitMQ ({}) a run longer than the broker's "
                "consumer_timeout ({:g}s) is delivered again while it still runs; give it a "
                "timeout", what, self.safe_url, self.consumer_timeout,
            )  # fmt: skip

    def _limit_text(self, seconds: float, task_id: str | None) -> str:
        whose = f" of task {task_id!r}" if task_id else ""
        return (
            f"the hard time limit{whose} ({seconds:g}s) is above the RabbitMQ consumer timeout "
            f"({self.consumer_timeout:g}s) of {self.safe_url}: the broker would close the "
            "channel while the task runs and deliver it again. Lower the limit, or raise "
            "consumer_timeout on the broker (rabbitmq.conf, milliseconds) and tell Conveyor "
            "with ?consumer_timeout=<seconds> in the URL"
        )

    def _publish(self, tickets: Sequence[Ticket]) -> None:
        self.link.publish([_message(ticket) for ticket in tickets], again=_new_copy)
        if not self._confirmed:
            self._confirmed_at = time.monotonic()
        self._confirmed += tickets
        self._note_confirmed(force=len(self._confirmed) >= _MARKS_BATCH)

    def _note_confirmed(self, *, force: bool = False) -> None:
        """Clear the publish deadlines of confirmed tickets (batched; see __init__)."""
        if self._confirmed and (force or time.monotonic() - self._confirmed_at >= _MARKS_AGE):
            confirmed, self._confirmed = self._confirmed, []
            self.store.published(confirmed)

    def _publish_due(self) -> float | None:
        """Publish what became due (at most every _DUE_RECHECK s); seconds to the next."""
        self._note_confirmed()
        now = time.monotonic()
        if now >= self._next_due_check:
            tickets, due_in = self.store.due(_DUE_BATCH, PUBLISH_GRACE)
            if tickets:
                self._publish(tickets)
            self._due_at = None if due_in is None else now + due_in
            wait = _DUE_RECHECK if due_in is None else min(_DUE_RECHECK, due_in)
            self._next_due_check = 0.0 if len(tickets) >= _DUE_BATCH else now + wait
        return None if self._due_at is None else max(0.0, self._due_at - now)

    # -- consuming ------------------------------------------------------------------------

    def claim(
        self, lease_seconds: float | None, max_deliveries: int, *, consumer: str = ""
    ) -> ClaimResult:
        hint = self._publish_due()
        for _ in range(_MAX_SKIPS):
            delivery = self.link.get()
            if delivery is None:
                return ClaimResult(None, hint)
            claimed = self._take(delivery, lease_seconds, max_deliveries, consumer)
            if claimed is not None:
                return ClaimResult(claimed)
        return ClaimResult(None, 0.0)

    def ack_and_claim(
        self,
        task_id: str,
        token: str,
        result_json: str | None,
        lease_seconds: float,
        max_deliveries: int,
        *,
        consumer: str = "",
    ) -> tuple[bool, ClaimResult]:
        """Take the next message first (``basic.get`` needs no free prefetch slot), then ack
        this task and claim the next in one store step, then ack this task's message: one
        broker round trip and one store write per task, the store still settled first."""
        hint = self._publish_due()
        delivery = self.link.get()
        if delivery is None:
            return self.ack(task_id, token, result_json), ClaimResult(None, hint)
        ticket = self._ticket_of(delivery)
        if ticket is None:
            acked = self.ack(task_id, token, result_json)
            return acked, self.claim(lease_seconds, max_deliveries, consumer=consumer)
        claim = TicketClaim(*ticket, delivery.redelivered, lease_seconds, max_deliveries, consumer)
        acked, claimed = self.store.ack_and_claim_ticket(task_id, token, result_json, claim)
        self._release(task_id, token)
        self._hold(delivery, claim, claimed)
        if isinstance(claimed, Unclaimed):
            return acked, self.claim(lease_seconds, max_deliveries, consumer=consumer)
        return acked, ClaimResult(claimed)

    def _ticket_of(self, delivery: Delivery) -> tuple[str, int, str] | None:
        """The ticket a message carries; an unreadable message goes to the dead queue."""
        ticket = _read_ticket(delivery.body)
        if ticket is None:
            logger.warning(
                "queue {}: a message in {} is not a Conveyor ticket; dead-lettered to {}",
                self.queue_name, self.topology.queue, self.topology.dead,
            )  # fmt: skip
            self.link.reject(delivery, requeue=False)
        return ticket

    def _take(
        self, delivery: Delivery, lease: float | None, max_deliveries: int, consumer: str
    ) -> Claimed | None:
        ticket = self._ticket_of(delivery)
        if ticket is None:
            return None
        claim = TicketClaim(*ticket, delivery.redelivered, lease, max_deliveries, consumer)
        claimed = self.store.claim_ticket(claim)
        self._hold(delivery, claim, claimed)
        return None if isinstance(claimed, Unclaimed) else claimed

    def _hold(self, delivery: Delivery, claim: TicketClaim, claimed: Claimed | Unclaimed) -> None:
        """Keep the message of a claimed task unacked (its lease); settle any other at once."""
        if claimed is Unclaimed.MISSING:
            logger.warning(
                "queue {}: task {!r} has no record in the task store {}; its message is "
                "dead-lettered to {}. Do all producers and workers use the same task store?",
                self.queue_name, claim.task_id, self.store.safe_url, self.topology.dead,
            )  # fmt: skip
            self.link.reject(delivery, requeue=False)
        elif isinstance(claimed, Unclaimed) or claim.lease_seconds is None:
            self.link.ack(delivery)  # a stale or tombstoned ticket, or a pull: consumed now
        else:
            self._held[claim.task_id] = (claimed.token, delivery)

    def wait(self, timeout: float) -> None:
        self.link.wait(timeout)

    # -- settling -------------------------------------------------------------------------

    def _release(self, task_id: str, token: str | None, *, requeue: bool = False) -> None:
        """Settle our delivery of a task at the broker (after the store settled the task)."""
        held = self._held.get(task_id)
        if held is None or (token is not None and held[0] != token):
            return
        del self._held[task_id]
        if requeue:
            self.link.reject(held[1], requeue=True)
        else:
            self.link.ack(held[1])

    def ack(self, task_id: str, token: str, result_json: str | None) -> bool:
        acked = self.store.ack(task_id, token, result_json)
        self._release(task_id, token)
        return acked

    def nack(
        self, task_id: str, token: str, delay: float, error_json: str | None, count_attempt: bool
    ) -> bool:
        back = self.store.requeue(task_id, token, delay, error_json, count_attempt)
        self._release(task_id, token, requeue=bool(back))
        if delay > 0:
            self._next_due_check = 0.0
        return back is not None

    def fail(
        self,
        task_id: str,
        token: str | None,
        reason: str,
        error_json: str | None,
        *,
        status: str = "failed",
    ) -> bool:
        failed = self.store.fail(task_id, token, reason, error_json, status=status)
        self._release(task_id, token)
        return failed

    def extend(self, task_id: str, token: str, lease_seconds: float) -> bool:
        """The lease is the unacked delivery: lost when its channel closed, not by time."""
        held = self._held.get(task_id)
        if held is not None and held[0] == token and not self.link.holds(held[1]):
            return False
        return self.store.extend(task_id, token, lease_seconds)

    def retry(self, task_id: str) -> bool:
        ticket = self.store.restage(task_id, PUBLISH_GRACE)
        if ticket is not None:
            self._publish([ticket])
        return ticket is not None

    def purge(self) -> int:
        """The broker's queues first: if that fails, no record is gone either."""
        self.link.purge()
        self._held.clear()
        return self.store.purge()

    def ping(self) -> None:
        self.link.ready_count()
        self.store.ping()

    def close(self) -> None:
        try:
            self._note_confirmed(force=True)
        except Exception as exc:  # the store is gone: a consumer republishes them later
            logger.warning("queue {}: could not note confirmed messages: {}", self.queue_name, exc)
        try:
            self.link.close()
        finally:
            self.store.close()
