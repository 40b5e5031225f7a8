"""The three storage seams every backend implements, and the values that cross them.

* :class:`QueueStore` — one queue's atomic transitions (enqueue, claim, settle, renew,
  cancel, retry, purge, sweep). Each call is one atomic step on the backend (a Lua script,
  a ``BEGIN IMMEDIATE`` transaction), so two consumers never both own a task and a crash
  between two calls never loses one. The rules they apply are ``conveyor.lifecycle``'s
  table; a store implements that table and adds no rule of its own.
* :class:`QueueRecords` — one queue's reads (get, list, counts, recent throughput, size).
* :class:`ServerRegistry` — what spans queues on one server: live workers, stop requests,
  the known queue names. A process opens it once per server: a worker on several queues
  of one server uses one connection.

A :class:`Server` (one per URL per process) hands out all three. Semantics that are not
storage (validation, JSON encoding, retry policy, record decoding) live once above, in
``QueueManager``.

Conventions every store follows (the conformance, transition-table and differential
suites in ``tests/`` check them):

* Times are epoch seconds from the backend's own clock where it has one (Redis ``TIME``),
  so lease deadlines do not depend on each worker's clock.
* ``attempts`` counts deliveries: a claim adds one. Order is highest priority first; within
  a priority, the order tasks became ready (push, due time, a counted nack, a re-drive); a
  task whose lease expired or that was handed back keeps its place.
* A ``token`` is a fencing token minted by a claim. Outcomes and renewals succeed only
  while the task is ``processing`` with that same token; otherwise nothing changes.
* A *ticket* is the generation of a task's place in line: it changes whenever the task
  gets a new place. A transport that carries tasks as messages (RabbitMQ) publishes a
  task's ticket, and a claim presenting a ticket that is no longer current claims nothing.
* Rows returned by :class:`QueueRecords` are dicts with the keys of :data:`ROW_FIELDS`;
  values may be raw (strings from Redis): ``conveyor.records`` decodes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..descriptors import readable_now
from ..errors import BackendError
from ..lifecycle import Op, TaskStatus

if TYPE_CHECKING:
    from .eventlog import EventLog

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
    "retry_backoff",  # float, a list of delays as JSON text, or None
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
    "expire_at",  # epoch seconds a never-started task times out (queue_timeout), or None
    "concurrency_key",  # per-key concurrency: the key (scoped to the queue), or None
    "max_concurrency",  # the key's limit this task asks for, or None
)


#: Ready tasks per declared priority: (priority, count, ready time of the oldest).
WaitingBands = list[tuple[int, int, float]]
#: Ready tasks a generic ``QueueRecords.waiting`` reads (stores with an index read all).
WAITING_SAMPLE = 10000


@dataclass(frozen=True, slots=True)
class NewTask:
    """A validated task ready to store: the manager has encoded and checked every field."""

    task_id: str
    priority: int
    data_json: str
    type: str | None = None
    delay: float = 0.0  # seconds from now (backend clock) until it may be claimed
    max_retries: int | None = None
    retry_backoff: float | str | None = None  # a list of delays travels as its JSON text
    queue_timeout: float | None = None  # seconds after it becomes ready before status timeout
    process_timeout: float | None = None
    #: Per-key concurrency: at most ``max_concurrency`` tasks of this key processing at once
    #: (the smallest limit among the key's running tasks and the candidate wins).
    concurrency_key: str | None = None
    max_concurrency: int | None = None
    #: Enqueue once: refused while *any* record of this id exists, finished ones too (a
    #: schedule's tick: its deterministic id and its record are the tick's claim).
    unique: bool = False


@dataclass(frozen=True, slots=True)
class Ticket:
    """A task's current place in line, for a transport to publish (RabbitMQ)."""

    task_id: str
    number: int
    priority: int


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What ``enqueue`` did: one flag per task (False: a live duplicate), and the tickets of
    the stored tasks that are ready now (a transport publishes them)."""

    stored: list[bool]
    tickets: list[Ticket]


@dataclass(frozen=True, slots=True)
class TicketClaim:
    """A delivered message to claim: the task and ticket it names, and which copy it is.

    ``copy`` tells apart the physical messages of one ticket (each publish makes a new one):
    only the copy that was claimed, coming back ``redelivered``, means its holder died.
    """

    task_id: str
    number: int
    copy: str
    redelivered: bool


@dataclass(frozen=True, slots=True)
class ClaimSpec:
    """How to claim: the lease, and which tasks qualify.

    ``lease`` None is at-most-once (``pull``): the task is marked processing with no lease
    and never redelivered. ``count`` claims up to that many tasks in one step (a worker with
    several free slots). ``min_priority`` takes a task only if the most urgent ready one has
    at least that declared priority (a reserved slot). ``ticket`` claims exactly the task a
    delivered message names, if that ticket is still current (RabbitMQ).
    """

    lease: float | None
    max_deliveries: int
    consumer: str = ""
    count: int = 1
    min_priority: int | None = None
    ticket: TicketClaim | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    """A task a store handed out. Values are as stored: the manager parses and checks them."""

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


#: Why a ticket claim took nothing: ``drop`` (a stale ticket, a duplicate copy, a finished
#: task: ack the message and forget it) or ``missing`` (no record: dead-letter the message).
UNCLAIMED_DROP, UNCLAIMED_MISSING = "drop", "missing"


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What one claim found: tasks, or how long until one may become ready.

    ``wait_hint`` is the number of seconds until the earliest delayed task is due or the
    earliest lease expires (None: nothing scheduled), so a blocked reserve can sleep
    exactly that long instead of polling. ``skipped`` is True when the claim retired
    entries (timed out, malformed) and stopped early: the caller may claim again at once.
    """

    claimed: list[Claimed]
    wait_hint: float | None = None
    unclaimed: str | None = None
    skipped: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """One settling step for a held task; a store applies a batch of them atomically.

    ``op`` is ``ACK`` (``payload``: result JSON), ``NACK`` (a counted try back in line after
    ``delay``; ``payload``: error JSON), ``HAND_BACK`` (back in line at its place, the try
    returned), ``FAIL`` (``reason``, ``payload``: error JSON; ``status`` ``failed`` or
    ``canceled``), ``CHECKPOINT`` (``payload``: steps JSON) or ``PROGRESS`` (``fraction``,
    ``payload``: message). ``token`` None (``FAIL`` only) acts whatever the task's state.
    """

    op: Op
    task_id: str
    token: str | None
    payload: str | None = None
    delay: float = 0.0
    reason: str | None = None
    fraction: float = 0.0
    status: TaskStatus = TaskStatus.FAILED


@dataclass(frozen=True, slots=True)
class Settled:
    """The effect of one outcome: the task's status after it (None: refused, because the
    token is not the holder's), and its new ticket when it went back in line at a new place
    (a transport publishes it)."""

    status: str | None
    ticket: Ticket | None = None


@dataclass(frozen=True, slots=True)
class Head:
    """The task at the head of the line: its declared priority and when it became ready.

    What a busy worker's preemption check and a reserved slot look at: one O(1) read (the
    first entry of the pending index), never a scan. With aging on, it is the task the next
    claim takes, with its declared (not aged) priority.
    """

    task_id: str
    priority: int
    ready_at: float


@dataclass(frozen=True, slots=True)
class Preempt:
    """A running task to yield at a step boundary (see ``QueueStore.preempt``).

    ``steps_json`` is its checkpoint, stored in the same step. ``min_priority`` is the
    lowest declared priority worth yielding for: the urgent task must have at least that.
    """

    task_id: str
    token: str
    steps_json: str | None
    min_priority: int
    max_preemptions: int


@dataclass(frozen=True, slots=True)
class LeaseState:
    """A running task as its holder's renewal sees it."""

    held: bool
    cancel_requested: bool = False


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Per-queue settings of a store.

    ``max_deliveries``: lease expiries before a task is dead-lettered as poison (the
    sweep's reaping uses it; claims pass their own). ``max_priority``: the highest priority
    (RabbitMQ declares its queue with it). ``broker_leases``: a transport (RabbitMQ) owns
    delivery: leases end when its delivery does, not by time (no reaping), and due tasks
    are promoted only through ``due`` so each gets published. ``publish_grace``: seconds a
    publisher has to get its broker's confirm before a consumer publishes the ticket again.
    """

    result_ttl: float = 7 * 24 * 3600
    max_deliveries: int = 5
    max_priority: int = 10
    broker_leases: bool = False
    publish_grace: float = 30.0
    #: Seconds of waiting worth one priority level (None: aging off). With aging on, the
    #: place in line is ``ready_at - priority * aging_interval``: a static score.
    aging_interval: float | None = None


class QueueStore(ABC):
    """One queue's atomic transitions. Instances are used from one thread at a time."""

    queue_name: str
    #: A forked child of the process may call ``settle`` on this store itself (its
    #: connections are made anew in the child): a worker's child then acks its task and
    #: claims the next one, leaving the worker out of the hand-off (see worker/direct.py).
    settles_in_child: bool = False
    #: ``doorbell`` gives a file descriptor (else the caller waits in ``wait``).
    has_doorbell: bool = False
    #: Readable once the caller is stopping (a worker's signal pipe): a store whose
    #: ``wait`` polls anyway returns at once then (see ``interrupted``).
    interrupt_fd: int | None = None

    def interrupted(self) -> bool:
        """Has ``interrupt_fd`` become readable? (The caller empties it, not the store.)"""
        return self.interrupt_fd is not None and readable_now(self.interrupt_fd)

    @abstractmethod
    def enqueue(self, tasks: Sequence[NewTask]) -> Enqueued:
        """Store tasks in one step. A task whose id is live (scheduled, pending, processing)
        is not touched (False); an id whose task finished is replaced by a fresh record."""

    @abstractmethod
    def claim(self, spec: ClaimSpec) -> ClaimResult:
        """Atomically take the most urgent ready task(s), without blocking.

        First promotes due tasks, reaps expired leases and times out expired waiting tasks
        (bounded work per call). Ids without a readable record are dead-lettered
        (``missing``/``malformed``); neither they nor timed-out tasks are returned.
        """

    @abstractmethod
    def settle(
        self, outcomes: Sequence[Outcome], then: ClaimSpec | None = None
    ) -> tuple[list[Settled], ClaimResult | None]:
        """Apply outcomes of held tasks in order, then (``then``) claim, in one step."""

    def preempt(self, yielded: Preempt, spec: ClaimSpec) -> tuple[Settled, ClaimResult]:
        """Yield a running task and claim the most urgent ready one, in one atomic step.

        The lifecycle's PREEMPT rows: refused (nothing changes, status None, nothing
        claimed) when a cancel was asked, when no ready task has ``min_priority``, or at
        ``max_preemptions``. Otherwise the yielded task is pending again at its original
        place (its checkpoint stored, its attempt returned, ``preemptions`` + 1, history
        ``preempted`` with the urgent task's id) and the urgent task is claimed with
        ``spec``. A yield that leaves ``processing`` frees the task's concurrency-key slot
        (per-key limits hook in where each store's preempt leaves processing).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot preempt")

    def head(self) -> Head | None:
        """The most urgent ready task (None: nothing is ready); one cheap read."""
        raise NotImplementedError(f"{type(self).__name__} cannot read its head")

    @abstractmethod
    def renew(self, leases: Sequence[tuple[str, str]], seconds: float | None) -> list[LeaseState]:
        """For each held ``(task_id, token)``: is it still held, and was a cancel asked?

        ``seconds`` extends each held lease to now + seconds; None only reads (a cheap poll
        that brings cancel requests to a running task within a second).
        """

    @abstractmethod
    def cancel(self, task_id: str) -> bool:
        """Cancel a task: a scheduled or pending one becomes ``canceled`` at once; a running
        one is flagged (its worker stops between steps). False if finished or unknown."""

    @abstractmethod
    def retry(self, task_id: str) -> Ticket | None:
        """Re-drive a failed, timed-out or canceled task: pending again, attempts reset, at
        the back of its band. Its new ticket, or None when it was not re-drivable."""

    @abstractmethod
    def due(self, limit: int) -> tuple[list[Ticket], float | None]:
        """Broker mode: promote due tasks (each with a new ticket) and hand out again the
        tickets whose publisher died (past ``publish_grace``); also seconds to the next due
        task (None: none). Each ticket returned is to be published now."""

    @abstractmethod
    def published(self, tickets: Sequence[Ticket]) -> None:
        """Broker mode: these tickets were confirmed by the broker: clear their deadlines."""

    @abstractmethod
    def sweep(self) -> None:
        """Maintenance: time out expired waiting tasks, reap expired leases, forget finished
        records past ``result_ttl``. Bounded work per call; a worker calls it now and then."""

    @abstractmethod
    def purge(self) -> int:
        """Delete every task of the queue, whatever its state; return how many were ready."""

    @abstractmethod
    def purge_finished(self, status: str, limit: int) -> int:
        """Delete up to ``limit`` records with a finished ``status``, oldest first; how many."""

    @abstractmethod
    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds or until a push may have made work ready.

        May return early (spuriously); the caller claims again and loops.
        """

    def doorbell(self, seconds: float) -> int | None:
        """A file descriptor that becomes readable when a push may have made work ready, or
        after about ``seconds``: a worker waits on it beside its children's pipes. None when
        the store has none (the worker then claims again every few milliseconds)."""
        return None

    def release_held(self) -> None:  # noqa: B027 (only RabbitMQ holds deliveries)
        """In a worker's child that settles by itself: the worker settled the tasks this
        process claimed; let go of what this process still holds for them."""

    def settled_by_child(  # noqa: B027 (only RabbitMQ holds deliveries)
        self, task_id: str, token: str | None, accepted: bool
    ) -> None:
        """In the worker: its child acked this task itself (``accepted``: the store took
        the ack); let go of what the worker holds for it."""

    def heard_doorbell(self) -> None:  # noqa: B027 (only stores with a doorbell act)
        """Take what made the doorbell readable, so that the next ``doorbell`` waits anew."""

    def withdraw_doorbell(self) -> None:  # noqa: B027 (only stores with a doorbell act)
        """The worker will not wait on the doorbell for a while (every slot is busy, or it
        is stopping): take back whatever would hold a wake-up another worker needs."""

    def close(self) -> None:  # noqa: B027 (most stores hold nothing of their own)
        """Flush what the store keeps for later; its server's connection stays open."""


class QueueRecords(ABC):
    """One queue's reads. They never change a task, and a damaged entry never fails them."""

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
    def now(self) -> float:
        """The backend's clock (epoch seconds), for what readers derive from stored times."""

    def waiting(self) -> WaitingBands:
        """Ready tasks per declared priority, most urgent first: (priority, how many, the
        ready time of the longest-waiting one). This generic form reads the first
        ``WAITING_SAMPLE`` tasks in line; a store that can do better (an index per priority)
        overrides it."""
        bands: dict[int, list[float]] = {}
        for row in self.list(TaskStatus.PENDING.value, WAITING_SAMPLE, 0):
            try:
                priority, created = int(row["priority"]), float(row["created_at"] or 0)
            except (TypeError, ValueError):
                continue
            ready = row.get("ready_at")
            try:
                moment = float(ready) if ready not in (None, "") else created
            except (TypeError, ValueError):
                moment = created
            band = bands.setdefault(priority, [0, moment])
            band[0] += 1
            band[1] = min(band[1], moment)
        return [(p, int(b[0]), b[1]) for p, b in sorted(bands.items(), reverse=True)]

    def preemptions(self) -> int:
        """How many times tasks of this queue yielded to more urgent ones (kept records)."""
        return 0


class ServerRegistry(ABC):
    """What spans the queues of one server."""

    @abstractmethod
    def register_worker(self, worker_id: str, info_json: str, ttl: float) -> bool:
        """Record a live worker for ``ttl`` seconds; True when it was asked to stop."""

    @abstractmethod
    def unregister_worker(self, worker_id: str) -> None:
        """Remove a worker that exits cleanly (a crashed one expires after its ttl)."""

    @abstractmethod
    def list_workers(self) -> Sequence[str]:
        """The info JSON of every live worker on this server (any queue)."""

    @abstractmethod
    def request_stop(self, worker_id: str | None) -> int:
        """Ask one worker, or every live one (None), to shut down gracefully; how many."""

    @abstractmethod
    def known_queues(self) -> Sequence[str]:
        """Names of the queues that hold tasks or were opened on this server, sorted."""

    @abstractmethod
    def note_queue(self, queue_name: str) -> None:
        """Remember a queue name (a producer or worker used it)."""

    @abstractmethod
    def forget_queue(self, queue_name: str) -> None:
        """Forget a queue name (it was cleared)."""

    # -- schedules (conveyor.schedules): every scheduler writes what it runs ------------------

    def note_schedule(
        self, name: str, fingerprint: str, definition_json: str, writer: str,
        next_run: float | None,
    ) -> None:  # fmt: skip
        """Record that ``writer`` runs schedule ``name`` with this definition, next at
        ``next_run``; two fingerprints under one name are a conflict readers report."""
        raise BackendError("this backend keeps no schedules registry")

    def advance_schedule(self, name: str, tick: float) -> None:
        """The latest tick of ``name`` that was pushed is at least ``tick``."""
        raise BackendError("this backend keeps no schedules registry")

    def forget_schedule(self, name: str) -> None:
        """Remove a schedule from the registry (it was deleted from every config)."""
        raise BackendError("this backend keeps no schedules registry")

    def schedules(self) -> list[dict[str, Any]]:
        """Every noted (name, fingerprint): ``name``, ``fingerprint``, ``definition``
        (JSON), ``writer``, ``seen_at``, ``next_run``, ``last_tick`` (None: none yet)."""
        raise BackendError("this backend keeps no schedules registry")


class Server(ABC):
    """One backend server, opened once per process: its connection(s), and the seams."""

    #: The server's URL with any password masked: safe for logs and error messages.
    safe_url: str
    registry: ServerRegistry

    @abstractmethod
    def store(self, queue_name: str, config: StoreConfig) -> QueueStore:
        """The transitions of one queue (cheap: shares this server's connection)."""

    @abstractmethod
    def records(self, queue_name: str) -> QueueRecords:
        """The reads of one queue (cheap: shares this server's connection)."""

    def check_time_limit(self, seconds: float | None, what: str) -> None:
        """Raise ConfigError if a run of ``seconds`` would be cut short by the server itself.

        Only RabbitMQ has such a limit (its ``consumer_timeout``); the others accept any.
        """
        return None

    def events(self, queue_name: str) -> EventLog:
        """The event log of one queue (see ``eventlog``)."""
        from ..errors import ConfigError

        raise ConfigError(f"{type(self).__name__} keeps no event log")

    @abstractmethod
    def ping(self) -> None:
        """Raise BrokerUnavailableError unless the server answers."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; idempotent."""
