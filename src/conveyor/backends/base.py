"""The narrow storage interface every backend implements.

Semantics (validation, retry policy, logging, record decoding) live once in
``QueueManager``; a backend only stores and moves tasks atomically. Each primitive is one
atomic step on the backend (a Lua script, a ``BEGIN IMMEDIATE`` transaction, ...), so two
workers can never both own a task and a crash between two calls never loses one.

Conventions every backend follows (the conformance suite in ``tests/`` checks them):

* Times are epoch seconds taken from the backend's own clock where it has one (Redis
  ``TIME``), so lease deadlines do not depend on each worker's clock.
* ``attempts`` counts deliveries: ``claim`` adds one. A lease that expires returns the task
  to pending at its original place in line; once ``expiries`` reaches ``max_deliveries``
  the task is dead-lettered (status ``failed``, ``dead_reason`` ``poison``) instead.
* Order: highest priority first; within a priority, the order tasks became ready (push
  time, or due time for delayed tasks); a task whose lease expired keeps its place.
* A ``token`` is a fencing token minted by ``claim``. ``ack``/``nack``/``fail``/``extend``/
  ``set_progress`` succeed only while the task is ``processing`` with that same token;
  otherwise they change nothing and return False.
* Rows returned by ``get``/``list`` are dicts with the keys of :data:`ROW_FIELDS`; values
  may be raw (strings from Redis); ``conveyor.records`` decodes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The fields of a stored task, shared by every backend's rows.
ROW_FIELDS = (
    "id",  # task id, unique within its queue
    "queue",
    "type",  # pipeline name or None
    "priority",  # int
    "data",  # JSON text of the payload
    "status",  # a TaskStatus value
    "attempts",  # deliveries so far
    "expiries",  # leases that ran out (poison counter)
    "max_retries",  # int or None
    "retry_backoff",  # float or None
    "queue_timeout",  # float seconds or None
    "process_timeout",  # float seconds or None
    "created_at",  # epoch seconds
    "scheduled_for",  # epoch seconds the task becomes due, or None
    "started_at",  # epoch seconds of the latest claim, or None
    "finished_at",  # epoch seconds it reached a finished status, or None
    "updated_at",
    "progress",  # float 0..1
    "progress_message",
    "result",  # JSON text or None
    "error",  # JSON text {"type", "message", "traceback"} or None
    "dead_reason",  # why it was dead-lettered: poison, error, malformed, missing, ...
    "cancel_requested",  # 1 when cancel was asked while processing
    "history",  # JSON lines, one {"at", "event", "attempt", "note"} object per line
    "steps",  # JSON object: results of the pipeline steps finished so far (checkpoints)
    "worker",  # id of the consumer that claimed it last, or None
)


@dataclass(frozen=True, slots=True)
class NewTask:
    """A validated task ready to store: the manager has encoded and checked every field."""

    task_id: str
    priority: int
    data_json: str
    type: str | None = None
    delay: float = 0.0  # seconds from now (backend clock) until it may be claimed
    max_retries: int | None = None
    retry_backoff: float | None = None
    queue_timeout: float | None = None  # seconds after it becomes due before status timeout
    process_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    """A task a backend handed out. Values are as stored: the manager parses and checks them."""

    task_id: str
    token: str
    attempts: int
    priority: Any
    data_json: Any
    type: str | None = None
    max_retries: Any = None
    retry_backoff: Any = None
    process_timeout: Any = None
    created_at: Any = None
    steps_json: Any = None


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What one claim attempt found: a task, or how long until one may become ready.

    ``wait_hint`` is the number of seconds until the earliest delayed task is due or the
    earliest lease expires (None: nothing scheduled), so a blocked reserve can sleep
    exactly that long instead of polling.
    """

    claimed: Claimed | None
    wait_hint: float | None = None


class Backend(ABC):
    """Storage for one queue. Instances are used from one thread at a time."""

    #: The backend's URL with any password masked: safe for logs and error messages.
    safe_url: str
    queue_name: str

    @abstractmethod
    def enqueue(self, tasks: Sequence[NewTask]) -> list[bool]:
        """Store tasks in one round trip; True for each stored, False for a live duplicate.

        A task whose id is scheduled, pending or processing is not touched (False). An id
        whose task finished is replaced by the new task (a fresh record).
        """

    @abstractmethod
    def claim(
        self, lease_seconds: float | None, max_deliveries: int, *, consumer: str = ""
    ) -> ClaimResult:
        """Atomically take the most urgent ready task, without blocking.

        ``consumer`` (a worker id, may be empty) is stored in the record's ``worker`` field.

        First promotes due delayed tasks and reaps expired leases (bounded work per call).
        ``lease_seconds`` None means at-most-once (``pull``): the task is marked processing
        with no lease and is never redelivered. Tasks whose ``queue_timeout`` passed are
        marked ``timeout`` and skipped; ids without a readable record are dead-lettered with
        ``dead_reason`` ``missing``; neither is returned.
        """

    @abstractmethod
    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds or until a push may have made work ready.

        May return early (spuriously); the caller claims again and loops.
        """

    @abstractmethod
    def ack(self, task_id: str, token: str, result_json: str | None) -> bool:
        """Finish a claimed task as ``success``, storing its result."""

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
        """Ack one task and claim the next; backends that can do both in one round trip do."""
        acked = self.ack(task_id, token, result_json)
        return acked, self.claim(lease_seconds, max_deliveries, consumer=consumer)

    @abstractmethod
    def nack(
        self, task_id: str, token: str, delay: float, error_json: str | None, count_attempt: bool
    ) -> bool:
        """Return a claimed task to the queue, ready after ``delay`` seconds.

        ``count_attempt`` False gives back the delivery (a shutdown hand-back is not a try).
        """

    @abstractmethod
    def fail(
        self,
        task_id: str,
        token: str | None,
        reason: str,
        error_json: str | None,
        *,
        status: str = "failed",
    ) -> bool:
        """Finish a task that did not succeed: ``failed`` (dead-letter, kept until retried or
        purged) with ``dead_reason``, or ``canceled`` (a running task that saw its cancel flag).

        ``token`` None fails the task whatever its state (used for malformed entries found
        by the manager right after a claim, and by operators).
        """

    @abstractmethod
    def checkpoint(self, task_id: str, token: str, steps_json: str) -> bool:
        """Store the results of the steps finished so far, so a retry resumes after them."""

    @abstractmethod
    def extend(self, task_id: str, token: str, lease_seconds: float) -> bool:
        """Push the lease deadline to now + ``lease_seconds``; False if the lease is lost."""

    @abstractmethod
    def set_progress(self, task_id: str, token: str, progress: float, message: str | None) -> bool:
        """Record progress of a claimed task."""

    @abstractmethod
    def cancel(self, task_id: str) -> bool:
        """Cancel a task: a scheduled or pending one becomes ``canceled`` at once; a processing
        one gets ``cancel_requested`` (its worker stops between steps). False if finished or
        unknown.
        """

    @abstractmethod
    def retry(self, task_id: str) -> bool:
        """Re-drive a finished (failed, timeout, canceled) task: pending again, attempts reset."""

    @abstractmethod
    def get(self, task_id: str) -> dict[str, Any] | None:
        """The stored row of a task (keys of ROW_FIELDS), or None."""

    @abstractmethod
    def list(self, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        """Rows with that status (any, if None): pending in claim order, others newest first."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of tasks per status (every TaskStatus value present, zeros included)."""

    @abstractmethod
    def recent(self, seconds: float) -> tuple[int, int, float | None]:
        """(succeeded, failed) within the last ``seconds``, and mean run time of successes."""

    @abstractmethod
    def size(self) -> int:
        """Number of pending (ready) tasks."""

    @abstractmethod
    def purge(self) -> int:
        """Delete every task of the queue, whatever its state; return how many were ready."""

    @abstractmethod
    def purge_finished(self, status: str, limit: int) -> int:
        """Delete up to ``limit`` records with a finished ``status``, oldest first; how many.

        Bounded work per call so a long dead-letter list is purged in steps (and can show
        progress); the caller repeats until it returns 0.
        """

    @abstractmethod
    def known_queues(self) -> Sequence[str]:
        """Names of the queues that hold tasks or were opened on this backend, sorted."""

    @abstractmethod
    def register_worker(self, worker_id: str, info_json: str, ttl: float) -> bool:
        """Record a live worker for ``ttl`` seconds; True when it was asked to stop."""

    @abstractmethod
    def unregister_worker(self, worker_id: str) -> None:
        """Remove a worker that exits cleanly (a crashed one expires after its ttl)."""

    @abstractmethod
    def list_workers(self) -> Sequence[str]:
        """The info JSON of every live worker on this backend (any queue)."""

    @abstractmethod
    def request_stop(self, worker_id: str | None) -> int:
        """Ask one worker, or every live one (None), to shut down gracefully; how many asked."""

    def check_time_limit(self, seconds: float | None, what: str) -> None:
        """Raise ConfigError if a run of ``seconds`` would be cut short by the backend itself.

        Only RabbitMQ has such a limit (its ``consumer_timeout``); the others accept any.
        """
        return None

    @abstractmethod
    def ping(self) -> None:
        """Raise BrokerUnavailableError unless the backend answers."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; idempotent."""
