"""The task store: where the RabbitMQ backend keeps what RabbitMQ does not.

RabbitMQ orders and delivers; it keeps no task state. Status, attempts, history, results,
errors, step checkpoints, the worker registry and cancel tombstones live in a store, which
is the SQLite or the Redis backend's own storage (the same rows and keys, so ``get_task``,
``list_tasks``, ``stats`` and the worker registry are theirs unchanged) plus the few
operations below that tie a record to the broker's messages.

A broker message is a *ticket*: ``{"id": <task id>, "ticket": <n>, "copy": <random>}``.
The record keeps the number of its current ticket; a claim presents the ticket it was
delivered, and the store honours only the current one of a live task. A nack with a delay
and a re-drive bump the number, so the message still in the queue (its ack may be lost)
is recognised as stale and dropped when it is met. A republish (after a lost confirm, or
by a consumer for a dead producer) keeps the number but is a new *copy*: whichever copy
comes first is claimed, the other dropped; and only the copy that was claimed, coming
back flagged redelivered, means that its holder died (a takeover), never another copy.

Publishing is made safe the same way the Redis backend makes claims safe: a record whose
ticket is being published carries a deadline (``publish_by``). The publisher clears it once
the broker confirmed (lazily: with its next write, or within a second); if the publisher
died in between, the next consumer to look finds the deadline passed and publishes the same
ticket again (if both copies landed, the second one met is dropped as a duplicate).
Delayed tasks stay ``scheduled`` in the store until due; a consumer then claims them in
one atomic step (the claim is the ticket bump) and publishes them. So nothing the store
accepted waits forever for a message that was never sent.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from loguru import logger

from ...errors import ConfigError
from ..base import Backend, Claimed, NewTask
from .topology import DEFAULT_TASK_STORE

#: How long a publisher has to get a confirm before a consumer republishes its ticket.
PUBLISH_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class Ticket:
    """A record's current ticket, to be published with the task's priority."""

    task_id: str
    number: int
    priority: int


@dataclass(frozen=True, slots=True)
class TicketClaim:
    """A delivered ticket to claim, and how: ``lease_seconds`` None is a pull (consumed).

    ``copy`` tells apart the physical messages of one ticket (each publish makes a new one):
    only the copy that was claimed, coming back redelivered, means its holder died.
    """

    task_id: str
    number: int
    copy: str
    redelivered: bool
    lease_seconds: float | None
    max_deliveries: int
    consumer: str


class Unclaimed(Enum):
    """Why a delivered ticket claimed nothing."""

    DROP = "drop"  # stale, a duplicate, or a finished task's (tombstone): ack and forget it
    MISSING = "missing"  # no record at all: another task store? dead-letter it, never lose it


@dataclass(frozen=True, slots=True)
class Staged:
    """What ``stage`` did: one flag per task (False: a live duplicate) and what to publish."""

    stored: list[bool]
    tickets: list[Ticket]


class TaskStore(Backend):
    """A Backend's storage plus the ticket operations. Every one is one atomic step."""

    @abstractmethod
    def stage(
        self, tasks: Sequence[NewTask], grace: float, confirmed: Sequence[Ticket] = ()
    ) -> Staged:
        """Store new tasks like ``enqueue``; ready ones get a ticket to publish within grace.

        ``confirmed``: tickets of earlier pushes the broker confirmed since, whose deadlines
        are cleared in the same step (``published``), saving a write per single push.
        """

    @abstractmethod
    def published(self, tickets: Sequence[Ticket]) -> None:
        """The broker confirmed these tickets: clear their publish deadlines."""

    @abstractmethod
    def due(self, limit: int, grace: float) -> tuple[list[Ticket], float | None]:
        """Claim the publication of due scheduled tasks and of tickets whose publisher died.

        Scheduled tasks due now become ``pending`` with a new ticket (in due order); pending
        tasks past their publish deadline are handed out again with their ticket. Returns them
        and the seconds until the next scheduled task is due (None: none is scheduled).
        """

    @abstractmethod
    def claim_ticket(self, claim: TicketClaim) -> Claimed | Unclaimed:
        """Claim the task a delivered ticket names, or say why not.

        ``DROP``: not the current ticket, a finished task (a cancel tombstone, a duplicate
        after success), or a task already processing under a ticket that was not
        redelivered as the very copy it was claimed with (another copy). ``MISSING``: no
        record of that id. The claimed copy of a processing task, redelivered, means its
        holder's channel closed: the task is taken
        over (``expiries`` + 1, a new fencing token) or, at ``max_deliveries``, dead-lettered
        as ``poison``.
        """

    @abstractmethod
    def ack_and_claim_ticket(
        self, task_id: str, token: str, result_json: str | None, claim: TicketClaim
    ) -> tuple[bool, Claimed | Unclaimed]:
        """``ack`` one task and ``claim_ticket`` the next in one step (a worker's hot path)."""

    @abstractmethod
    def requeue(
        self, task_id: str, token: str, delay: float, error_json: str | None, count_attempt: bool
    ) -> bool | None:
        """``nack``: True if the held ticket may go back to the queue as it is (no delay),
        False if it must be acked (delayed: a new ticket is published when due; or the task
        was canceled), None if the token is not the holder's (nothing changed)."""

    @abstractmethod
    def restage(self, task_id: str, grace: float) -> Ticket | None:
        """``retry``: a failed, timed-out or canceled task becomes pending with a new ticket."""


_announced: set[str] = set()  # default task stores already named in the log (once each)


def default_task_store() -> str:
    """``conveyor-rabbitmq.db`` in the working directory, as an absolute path (logged once,
    since a process started elsewhere would open a different file)."""
    path = os.path.abspath(DEFAULT_TASK_STORE.removeprefix("sqlite:///"))
    if path not in _announced:
        _announced.add(path)
        logger.info(
            "RabbitMQ task store: {} (the default; set task_store to share one store "
            "between processes started in other directories or on other hosts)", path,
        )  # fmt: skip
    return f"sqlite:///{path}"


def open_store(
    url: str, queue_name: str, *, result_ttl: float, connect_timeout: float
) -> TaskStore:
    """The task store a URL names: ``sqlite:///path`` or ``redis://`` (``rediss://``)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        from .. import sqlite_path_from_url
        from .sqlite_store import SqliteTaskStore

        return SqliteTaskStore(sqlite_path_from_url(url), queue_name, result_ttl=result_ttl)
    if scheme in ("redis", "rediss", "unix"):
        from .redis_store import RedisTaskStore

        return RedisTaskStore(
            url, queue_name, result_ttl=result_ttl, connect_timeout=connect_timeout
        )
    raise ConfigError(
        f"task_store: {url.split('://', 1)[0]!r} is not a task store; use "
        "sqlite:///path/to/tasks.db or redis://host:6379/0 (RabbitMQ keeps no task state)"
    )
