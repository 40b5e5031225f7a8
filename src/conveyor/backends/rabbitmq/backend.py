"""``RabbitMQQueue``: RabbitMQ orders and delivers, the task store remembers.

See the package docstring for the design. Each transition is a broker step and a store
step, always in the order that keeps "nothing lost", and the store step is the store's own
public transition (``enqueue``, ``claim`` with a ticket, ``settle``...) in broker mode:

* push: store first (the record, with a publish deadline), publish, then clear the
  deadline. A crash in between leaves a record a consumer republishes; never a message
  without a record that nobody would honour.
* settle (ack, nack, fail): store first, then the broker. A crash in between leaves the
  delivery unacked; the broker redelivers it and the store drops it (finished) — never a
  broker ack for a task the store still thinks is running.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace

from loguru import logger

from ...errors import BrokerUnavailableError, TaskValidationError
from ...lifecycle import Op, TaskStatus
from ..base import (
    UNCLAIMED_MISSING,
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
    Ticket,
    TicketClaim,
)
from .calls import Delivery, Outgoing
from .link import Doorbell, Link
from .topology import Topology, limit_text

_MAX_SKIPS = 500  # dropped tickets skipped per claim before yielding to the caller
_DUE_RECHECK = 0.25  # seconds between looks for due scheduled tasks (per consumer)
_DUE_BATCH = 500  # scheduled tasks published per look
_MARKS_BATCH, _MARKS_AGE = 256, 1.0  # confirmed tickets noted in the store in batches
_RELEASING = frozenset({Op.ACK, Op.NACK, Op.HAND_BACK, Op.FAIL})
_FLOOR_POLL = 0.05  # seconds between looks at the store's head for a claim with a floor


def _message(ticket: Ticket) -> Outgoing:
    """A new copy of a ticket: ``{"id", "ticket", "copy"}``, the copy unique per publish."""
    body = {"id": ticket.task_id, "ticket": ticket.number, "copy": uuid.uuid4().hex[:16]}
    return Outgoing(min(ticket.priority, 255), json.dumps(body, separators=(",", ":")).encode())


def _new_copy(message: Outgoing) -> Outgoing:
    """The same ticket as a new copy, for a publish that is tried again."""
    value = json.loads(message.body)
    return _message(Ticket(value["id"], value["ticket"], message.priority))


def _read_ticket(delivery: Delivery) -> TicketClaim | None:
    try:
        value = json.loads(delivery.body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    task_id, number, copy = value.get("id"), value.get("ticket"), value.get("copy", "")
    if not isinstance(task_id, str) or not task_id or type(number) is not int:
        return None
    return TicketClaim(task_id, number, copy if isinstance(copy, str) else "", delivery.redelivered)


class RabbitMQQueue(QueueStore):
    """One Conveyor queue on RabbitMQ, with its records in a task store (in broker mode)."""

    def __init__(
        self, link: Link, topology: Topology, store: QueueStore, *, consumer_timeout: float
    ) -> None:
        self.queue_name = store.queue_name
        self.link, self.topology, self.store = link, topology, store
        self.consumer_timeout = consumer_timeout
        self._held: dict[str, tuple[str, Delivery]] = {}  # task id -> (token, its delivery)
        self._next_due_check = 0.0
        self._due_at: float | None = None
        # Confirmed tickets whose publish deadlines are not cleared in the store yet: cleared
        # in batches, or within a second, instead of one more store write per push. Lost
        # marks only cost a duplicate message, which the store drops.
        self._confirmed: list[Ticket] = []
        self._confirmed_at = 0.0
        self._doorbell: Doorbell | None = None
        # The last claim was for a reserved slot (it had a floor): a doorbell would ring for
        # every push, urgent or not (see ``doorbell``).
        self._holding_back = False
        # A worker's forked child settles and claims on a link of its own (see
        # ``_own_link``): possible when the task store works from a forked child too.
        self.settles_in_child = store.settles_in_child
        self._pid = os.getpid()
        self._child_link = False  # this process is a child that opened a link of its own

    # -- producing ------------------------------------------------------------------------

    def enqueue(self, tasks: Sequence[NewTask]) -> Enqueued:
        for task in tasks:
            limit = task.process_timeout
            if limit is not None and limit > self.consumer_timeout:
                text = limit_text(limit, self.consumer_timeout, self.link.safe_url, task.task_id)
                raise TaskValidationError("process_timeout", text)
        self._publish_due()  # as every store does first: due tasks enter the line first
        enqueued = self.store.enqueue(tasks)
        if enqueued.tickets:
            self._publish(enqueued.tickets)
        if any(task.delay > 0 for task in tasks):
            self._next_due_check = 0.0
        return enqueued

    def _publish(self, tickets: Sequence[Ticket]) -> None:
        messages = [_message(ticket) for ticket in tickets]
        self.link.publish(self.topology, messages, again=_new_copy)
        if not self._confirmed:
            self._confirmed_at = time.monotonic()
        self._confirmed += tickets
        self._note_confirmed(force=len(self._confirmed) >= _MARKS_BATCH)

    def _note_confirmed(self, *, force: bool = False) -> None:
        """Clear the publish deadlines of confirmed tickets (batched; see __init__)."""
        if self._confirmed and (force or time.monotonic() - self._confirmed_at >= _MARKS_AGE):
            confirmed, self._confirmed = self._confirmed, []
            self.store.published(confirmed)

    def _publish_due(self, *, force: bool = False) -> float | None:
        """Publish what became due (at most every _DUE_RECHECK s); seconds to the next."""
        self._note_confirmed()
        now = time.monotonic()
        if force or now >= self._next_due_check:
            tickets, due_in = self.store.due(_DUE_BATCH)
            if tickets:
                self._publish(tickets)
            self._due_at = None if due_in is None else now + due_in
            wait = _DUE_RECHECK if due_in is None else min(_DUE_RECHECK, due_in)
            self._next_due_check = 0.0 if len(tickets) >= _DUE_BATCH else now + wait
        return None if self._due_at is None else max(0.0, self._due_at - now)

    # -- consuming ------------------------------------------------------------------------

    def claim(self, spec: ClaimSpec) -> ClaimResult:
        hint = self._publish_due()
        self._holding_back = spec.min_priority is not None
        if spec.min_priority is not None and not self._urgent_ready(spec.min_priority):
            return ClaimResult([], hint)  # a reserved slot: nothing urgent enough is ready
        claimed: list[Claimed] = []
        for _ in range(_MAX_SKIPS):
            if len(claimed) >= max(1, spec.count):
                return ClaimResult(claimed)
            delivery = self._head(spec)
            if delivery is None:
                return ClaimResult(claimed, None if claimed else hint)
            ticket = self._ticket_of(delivery)
            if ticket is None:
                continue
            try:
                result = self.store.claim(replace(spec, ticket=ticket, count=1))
            except Exception as exc:
                self.link.reject(delivery, requeue=True)  # not ours: back to the queue at once
                if claimed and isinstance(exc, BrokerUnavailableError):
                    return ClaimResult(claimed)  # hand them out; the next call meets the outage
                raise
            claimed += self._hold(delivery, ticket, spec, result)
        return ClaimResult(claimed, 0.0, skipped=not claimed)

    def _head(self, spec: ClaimSpec) -> Delivery | None:
        """The broker's head, or None. For a reserved slot, a message below its floor goes
        back to its place: the store's head was urgent, but the head the broker handed us
        may not be (a doorbell received it earlier, or the urgent message is with another
        consumer), and the store's ticket claim does not look at priorities. The head is
        asked once more after that (the requeue reaches the broker first)."""
        floor = spec.min_priority
        for _ in range(2):
            delivery = self.link.get(self.topology)
            if delivery is None or floor is None or delivery.priority >= floor:
                return delivery
            self.link.reject(delivery, requeue=True)
        return None

    def _urgent_ready(self, min_priority: int) -> bool:
        """A reserved slot's check, read from the task store: the broker's head of line is
        its most urgent message, and the store's head says how urgent that is."""
        head = self.store.head()
        return head is not None and head.priority >= min_priority

    def head(self) -> Head | None:
        return self.store.head()

    def preempt(self, yielded: Preempt, spec: ClaimSpec) -> tuple[Settled, ClaimResult]:
        """Take the broker's head message, and let the task store yield and claim it in one
        step; a refusal puts the message back. The yielded task's delivery goes back to the
        broker: the task keeps its ticket, so its place."""
        self._publish_due()
        refused = (Settled(None), ClaimResult([]))
        if not self._urgent_ready(yielded.min_priority):
            return refused
        delivery = self._head(spec)
        ticket = self._ticket_of(delivery) if delivery is not None else None
        if delivery is None or ticket is None:
            return refused
        try:
            settled, result = self.store.preempt(yielded, replace(spec, ticket=ticket, count=1))
        except Exception:
            self.link.reject(delivery, requeue=True)  # not claimed: back to the queue
            raise
        if settled.status is None:
            self.link.reject(delivery, requeue=True)
            return refused
        # PER-KEY LIMITS HOOK: the store's preempt freed the yielded task's key slot.
        with contextlib.suppress(BrokerUnavailableError):
            self._release(Outcome(Op.HAND_BACK, yielded.task_id, yielded.token), settled)
        return settled, ClaimResult(self._hold(delivery, ticket, spec, result))

    def _ticket_of(self, delivery: Delivery) -> TicketClaim | None:
        """The ticket a message carries; an unreadable message goes to the dead queue."""
        ticket = _read_ticket(delivery)
        if ticket is None:
            logger.warning(
                "queue {}: a message in {} is not a Conveyor ticket; dead-lettered to {}",
                self.queue_name, self.topology.queue, self.topology.dead,
            )  # fmt: skip
            self.link.reject(delivery, requeue=False)
        return ticket

    def _hold(
        self, delivery: Delivery, ticket: TicketClaim, spec: ClaimSpec, result: ClaimResult
    ) -> list[Claimed]:
        """Keep the message of a claimed task unacked (its lease); settle any other at once."""
        if result.unclaimed == UNCLAIMED_MISSING:
            logger.warning(
                "queue {}: task {!r} has no record in the task store; its message is "
                "dead-lettered to {}. Do all producers and workers use the same task store?",
                self.queue_name, ticket.task_id, self.topology.dead,
            )  # fmt: skip
            self.link.reject(delivery, requeue=False)
        elif not result.claimed or spec.lease is None:
            self.link.ack(delivery)  # a stale or tombstoned ticket, or a pull: consumed now
        else:
            self._held[ticket.task_id] = (result.claimed[0].token, delivery)
        return result.claimed

    has_doorbell = True

    def doorbell(self, seconds: float) -> int | None:
        """The pipe a doorbell consumer rings (``Link.doorbell``). None for a reserved slot
        (the last claim had a floor): the consumer rings for any message, and one that is
        not urgent enough would ring again once given back; the worker then polls the task
        store's head instead."""
        if self._holding_back:
            self.withdraw_doorbell()  # and give back what it received
            return None
        if self._doorbell is None:
            self._doorbell = self.link.doorbell(self.topology)
        return self._doorbell.fd()

    def heard_doorbell(self) -> None:
        if self._doorbell is not None:
            self._doorbell.heard()

    def withdraw_doorbell(self) -> None:
        if self._doorbell is not None:
            self._doorbell.withdraw()

    def wait(self, timeout: float) -> None:
        hint = self._due_at
        if hint is not None:
            timeout = min(timeout, max(0.001, hint - time.monotonic()))
        if self._holding_back:  # a doorbell would ring for the ordinary head again and again
            time.sleep(min(timeout, _FLOOR_POLL))
            return
        self.link.wait(self.topology, timeout)

    # -- settling -------------------------------------------------------------------------

    def settle(
        self, outcomes: Sequence[Outcome], then: ClaimSpec | None = None
    ) -> tuple[list[Settled], ClaimResult | None]:
        """The store settles first, then the broker. With ``then``, the next message is
        taken first (``basic.get`` needs no free prefetch slot) so that settling this task
        and claiming the next is one store step: one broker round trip and one store write
        per task on a worker's hot path."""
        self._own_link()
        self._publish_due()
        claimed: ClaimResult | None = None
        reserved = then is not None and then.min_priority is not None
        if then is not None:
            self._holding_back = reserved
        if reserved and then is not None and not self._urgent_ready(then.min_priority or 0):
            settled, _ = self.settle(outcomes)  # a reserved slot, and nothing urgent is ready
            return settled, ClaimResult([])
        delivery = self._head(then) if then is not None and then.count == 1 else None
        ticket = self._ticket_of(delivery) if delivery is not None else None
        if then is not None and delivery is not None and ticket is not None:
            try:
                settled, result = self.store.settle(outcomes, replace(then, ticket=ticket))
            except Exception:  # nothing applied: a worker's child lives on after any error
                self.link.reject(delivery, requeue=True)  # not claimed: back to the queue
                raise
            assert result is not None
            claimed = ClaimResult(self._hold(delivery, ticket, then, result))
        else:
            settled, _ = self.store.settle(outcomes)
        # The store step is done: the outcomes count, whatever the broker does next. A new
        # ticket whose publish fails is published again after publish_grace (by ``due``),
        # and a claim that fails leaves the outage to the caller's next call.
        for outcome, effect in zip(outcomes, settled, strict=True):
            if outcome.op in _RELEASING:
                with contextlib.suppress(BrokerUnavailableError):
                    self._release(outcome, effect)
        if then is not None and (claimed is None or not claimed.claimed):
            try:
                claimed = self.claim(then)
            except BrokerUnavailableError:
                claimed = ClaimResult([])
        return settled, claimed

    def _release(self, outcome: Outcome, effect: Settled) -> None:
        """Settle our delivery of a task at the broker, as the store's outcome says. A
        task whose delivery another process holds (a worker and its child, see
        ``release_held``) still gets its new ticket published here."""
        held = self._held.get(outcome.task_id)
        if held is not None and (outcome.token is None or held[0] == outcome.token):
            del self._held[outcome.task_id]
        else:
            held = None  # not ours to settle at the broker; a new ticket still is
        if effect.status is None or (effect.status == TaskStatus.PENDING and effect.ticket is None):
            # Refused (the task is not ours any more: the store decides on redelivery,
            # drop it, or run it again when the store lost our claim), or handed back (it
            # keeps its place): the message goes back.
            if held is not None:
                self.link.reject(held[1], requeue=True)
            return
        if effect.status == TaskStatus.PENDING and effect.ticket is not None:
            self._publish([effect.ticket])  # a new place: the new ticket, then ack the old
        elif effect.status == TaskStatus.SCHEDULED:
            self._next_due_check = 0.0
        if held is not None:
            self.link.ack(held[1])

    # -- a worker's child settling by itself (worker/direct.py) -----------------------------

    def _own_link(self) -> None:
        """In a forked child, open a link of its own on first use: the parent's I/O thread
        did not come along, and the deliveries it holds are the parent's to settle."""
        if self._pid == os.getpid():
            return
        self.link = self.link.for_this_process()
        self._pid, self._child_link = os.getpid(), True
        self._held, self._confirmed, self._doorbell = {}, [], None

    def release_held(self) -> None:
        """A worker's child, asked to run a task by the worker: the tasks it claimed itself
        before have ended on the worker's path (a failure, a retry), settled in the store
        by the worker. Their deliveries, held on this process's channel, go back to the
        queue, where the store drops them as stale (or, for a task handed back, keeps their
        place). Not before: a delivery back in the queue while its task still runs in the
        store would be taken for a crashed holder's, and run again."""
        if not self._child_link or self._pid != os.getpid():
            return  # never settled here: what ``_held`` names is the worker's
        held, self._held = self._held, {}
        for _, delivery in held.values():
            self.link.reject(delivery, requeue=True)

    def settled_by_child(self, task_id: str, token: str | None, accepted: bool) -> None:
        """The worker: its child acked this task in the store itself; settle the delivery
        the worker holds for it (if the worker claimed it) as that ack says."""
        effect = Settled(TaskStatus.SUCCESS if accepted else None)
        with contextlib.suppress(BrokerUnavailableError):
            self._release(Outcome(Op.ACK, task_id, token), effect)

    def renew(self, leases: Sequence[tuple[str, str]], seconds: float | None) -> list[LeaseState]:
        """The lease is the unacked delivery: lost when its channel closed, not by time."""
        states = self.store.renew(leases, seconds)
        for i, (task_id, token) in enumerate(leases):
            held = self._held.get(task_id)
            if held is not None and held[0] == token and not self.link.holds(held[1]):
                states[i] = LeaseState(False, states[i].cancel_requested)
        return states

    # -- the rest -------------------------------------------------------------------------

    def cancel(self, task_id: str) -> bool:
        self._publish_due()
        return self.store.cancel(task_id)  # a pending task's message becomes a tombstone

    def retry(self, task_id: str) -> Ticket | None:
        self._publish_due()
        ticket = self.store.retry(task_id)
        if ticket is not None:
            self._publish([ticket])
        return ticket

    def due(self, limit: int) -> tuple[list[Ticket], float | None]:
        return self.store.due(limit)

    def published(self, tickets: Sequence[Ticket]) -> None:
        self.store.published(tickets)

    def sweep(self) -> None:
        self._publish_due(force=True)
        self.store.sweep()

    def purge(self) -> int:
        """The broker's queues first: if that fails, no record is gone either."""
        self.link.purge(self.topology)
        self._held.clear()
        return self.store.purge()

    def purge_finished(self, status: str, limit: int) -> int:
        return self.store.purge_finished(status, limit)  # finished tasks have no message left

    def close(self) -> None:
        """Note what the broker confirmed, so consumers need not publish it again."""
        if self._doorbell is not None:
            self._doorbell.close()
            self._doorbell = None
        try:
            self._note_confirmed(force=True)
        except Exception as exc:  # the store is gone: a consumer republishes them later
            logger.warning("queue {}: could not note confirmed messages: {}", self.queue_name, exc)
