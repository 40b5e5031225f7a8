"""``QueueManager``: the producer's API and the worker's connection, on any backend.

The manager validates input, encodes JSON, decodes what backends hand out and loops on
blocking waits; underneath, a queue store applies the lifecycle's transitions atomically,
queue records answer reads and the server registry keeps workers (see ``backends.base``).
That split is why the backends behave the same.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from loguru import logger
from pydantic import BaseModel

from . import outcomes as build
from .aging import check_aging
from .backends import (
    Claimed,
    ClaimResult,
    ClaimSpec,
    Head,
    LeaseState,
    NewTask,
    Outcome,
    Preempt,
    QueueBackend,
    Server,
    Settled,
    StoreConfig,
    backend_for_url,
    open_server,
    spec_for_kind,
)
from .backends.eventlog import EventLog, LiveEvent
from .codec import (
    ErrorLike,
    delay_from,
    optional_float,
    steps_from,
    strict_int,
)
from .errors import (
    BrokerUnavailableError,
    ConfigError,
    TaskNotFoundError,
    TaskTypeError,
    TaskValidationError,
)
from .heartbeat import heartbeat_from
from .keylimits import key_fields
from .lifecycle import FINISHED_STATUSES, DeadReason, TaskStatus
from .models import Message, TaskRecord
from .records import record_from_row
from .retries import check_backoff, decode_backoff, encode_backoff
from .validation import (
    DEFAULT_JSON_DEPTH,
    MAX_JSON_DEPTH,
    check_name,
    check_optional_count,
    check_priority,
    check_queue_name,
    check_seconds,
    check_task_id,
    check_type_name,
    decode_json,
    encode_json,
)

if TYPE_CHECKING:
    from .settings import Settings

DEFAULT_PRIORITY = 5
#: The longest single backend wait while blocking "forever"; keeps a blocked reserve
#: responsive to its caller's shutdown flag between waits.
_MAX_WAIT_SLICE = 1.0

_TASK_OPTIONS = frozenset(
    {"type", "delay", "eta", "max_retries", "retry_backoff", "queue_timeout", "process_timeout",
     "concurrency_key", "max_concurrency"}
)  # fmt: skip


class WaitingBand(BaseModel):
    """The ready tasks of one declared priority: how many, and the oldest one's wait."""

    priority: int
    count: int
    oldest_seconds: float


class QueueStats(BaseModel):
    """A queue's counts per status and its recent throughput."""

    queue: str
    counts: dict[str, int]
    done_last_minute: int
    failed_last_minute: int
    mean_run_seconds: float | None
    #: Ready tasks per declared priority, most urgent first, with the longest wait of each.
    waiting: list[WaitingBand] = []
    #: How many times tasks of this queue yielded to more urgent ones (records kept).
    preemptions: int = 0


class _SharedServer:
    """A server shared by the managers of several queues: closed with the last of them."""

    def __init__(self, server: Server, owners: int) -> None:
        self.server, self.owners = server, owners

    def release(self) -> None:
        self.owners -= 1
        if self.owners == 0:
            self.server.close()


class QueueManager:
    """One queue on one backend. Not thread-safe: give each thread its own manager.

    ``pull`` is at-most-once (the task is consumed as it is handed out);
    ``reserve`` is at-least-once (the task is leased for ``visibility_timeout`` seconds and
    comes back if the consumer dies before ``ack``/``nack``). ``for_queue`` opens another
    queue on the same server connection.
    """

    def __init__(
        self,
        backend: QueueBackend | str = QueueBackend.SQLITE,
        *,
        queue_name: str = "default",
        sqlite_path: str = "conveyor.db",
        redis_url: str | None = None,
        rabbitmq_url: str | None = None,
        visibility_timeout: float = 60.0,
        max_deliveries: int = 5,
        max_priority: int = 10,
        max_payload_bytes: int = 1024 * 1024,
        result_ttl: float = 7 * 24 * 3600,
        connect_timeout: float = 5.0,
        task_store: str | None = None,
        durability: str | None = None,
        url: str | None = None,
        server: Server | None = None,
        max_json_depth: int = DEFAULT_JSON_DEPTH,
        reader: bool = False,
        key_limits: Mapping[str, int] | None = None,
        aging_interval: float | None = None,
    ) -> None:
        spec = spec_for_kind(backend)
        _check_tuning(
            visibility_timeout, max_deliveries, max_priority, max_payload_bytes, max_json_depth
        )
        try:
            self.queue_name = check_queue_name(queue_name)
        except (TaskValidationError, TaskTypeError) as exc:
            raise ConfigError(str(exc)) from None
        self.visibility_timeout = float(visibility_timeout)
        self.max_deliveries = max_deliveries
        self.max_priority = max_priority
        self.max_payload_bytes = max_payload_bytes
        #: How deep JSON (data, results, checkpoints) may nest: ``queue.max_json_depth``.
        self.max_json_depth = max_json_depth
        self.backend_kind = spec.kind
        #: Stored as the ``worker`` of each task this manager claims (a TaskWorker sets it).
        self.consumer_id = ""
        #: After a claim that found nothing: seconds until a scheduled task is due, a lease
        #: runs out or a waiting task times out (None: none is), for a caller that waits.
        self.wait_hint: float | None = None
        #: Configured per-key limits of this queue (``queue.key_limits``; ``"*"``: any key).
        self.key_limits: dict[str, int] = dict(key_limits or {})
        self.aging_interval = check_aging(spec.kind, aging_interval)
        self._config = StoreConfig(
            result_ttl=result_ttl, max_deliveries=max_deliveries, max_priority=max_priority,
            aging_interval=self.aging_interval,
        )  # fmt: skip
        if server is None:
            options: dict[str, Any] = {"connect_timeout": connect_timeout}
            if reader and spec.kind is QueueBackend.SQLITE:
                options["create"] = False  # a reader never creates a file or directory
            if task_store is not None:
                if spec.kind is not QueueBackend.RABBITMQ:
                    raise ConfigError("task_store: only the RabbitMQ backend uses a task store")
                options["task_store"] = task_store
            if durability is not None:
                if spec.kind is not QueueBackend.REDIS:
                    raise ConfigError(
                        "durability: only the Redis backend waits for replicas (for a "
                        "RabbitMQ task store on Redis, put ?durability= in its URL)"
                    )
                options["durability"] = durability
            target = url or _url_for(
                spec.kind, spec.default_url, sqlite_path, redis_url, rabbitmq_url
            )
            server = open_server(target, **options)
            self._shared = _SharedServer(server, 1)
        else:
            self._shared = _SharedServer(server, 0)  # the caller owns it
        try:
            self._store = server.store(self.queue_name, self._config)
            self._records = server.records(self.queue_name)
        except BaseException:
            self._shared.release()
            raise
        self._closed = False
        self._events: EventLog | None = None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, queue_name: str = "default", **options: Any) -> Self:
        """Open the backend a URL names: ``sqlite:///path.db``, ``redis://``, ``amqp://``..."""
        return cls(backend_for_url(url), queue_name=queue_name, url=url, **options)

    def for_queue(self, queue_name: str) -> Self:
        """Another queue on this manager's server connection, with the same tuning.

        A worker on several queues of one server so holds one connection (on RabbitMQ, one
        AMQP connection). The server closes with the last manager that uses it.
        """
        sibling = type(self)(
            self.backend_kind, queue_name=queue_name, server=self._shared.server,
            visibility_timeout=self.visibility_timeout, max_deliveries=self.max_deliveries,
            max_priority=self.max_priority, max_payload_bytes=self.max_payload_bytes,
            result_ttl=self._config.result_ttl, max_json_depth=self.max_json_depth,
            key_limits=self.key_limits,
            aging_interval=self.aging_interval,
        )  # fmt: skip
        sibling._shared = self._shared
        self._shared.owners += 1
        return sibling

    @classmethod
    def from_settings(
        cls, settings: Settings, queue_name: str | None = None, *, reader: bool = False
    ) -> Self:
        """Open the queue that validated settings (``config/*.yaml`` + env) describe.

        ``reader``: only to read (a status page): a SQLite file that does not exist is an
        error instead of being created, directory and all."""
        queue = settings.queue
        return cls.from_url(
            settings.backend_url(),
            queue_name=queue_name or queue.name,
            visibility_timeout=queue.visibility_timeout,
            max_deliveries=queue.max_deliveries,
            max_priority=queue.max_priority,
            max_payload_bytes=queue.max_payload_bytes,
            max_json_depth=queue.max_json_depth,
            result_ttl=queue.result_ttl,
            connect_timeout=queue.connect_timeout,
            reader=reader,
            key_limits=queue.key_limits,
            aging_interval=queue.aging_interval,
            **_store_option(settings),
        )

    @property
    def url(self) -> str:
        """The backend URL with its password masked."""
        return self._shared.server.safe_url

    @property
    def server(self) -> Server:
        """The server this queue lives on (shared with ``for_queue`` siblings)."""
        return self._shared.server

    # -- producing --------------------------------------------------------------------------

    def push(
        self,
        task_id: str | None,
        data: Any,
        priority: int = DEFAULT_PRIORITY,
        *,
        type: str | None = None,
        delay: float | None = None,
        eta: datetime | float | None = None,
        max_retries: int | None = None,
        retry_backoff: float | Sequence[float] | None = None,
        queue_timeout: float | None = None,
        process_timeout: float | None = None,
        concurrency_key: str | None = None,
        max_concurrency: int | None = None,
    ) -> bool:
        """Enqueue one task; True if stored, False if that id is already live.

        ``concurrency_key``/``max_concurrency``: at most that many tasks of the key (scoped
        to this queue) process at once, across all workers; the smallest limit wins. A
        limit configured for the key (``key_limits``) applies too.

        Raises ``TaskValidationError``/``TaskTypeError`` (``ValueError``/``TypeError``)
        naming the bad field before anything is written.
        """
        options = {
            "type": type,
            "delay": delay,
            "eta": eta,
            "max_retries": max_retries,
            "retry_backoff": retry_backoff,
            "queue_timeout": queue_timeout,
            "process_timeout": process_timeout,
            "concurrency_key": concurrency_key,
            "max_concurrency": max_concurrency,
        }
        task = self._new_task(task_id, data, priority, options)
        return self._store.enqueue([task]).stored[0]

    def push_once(self, task_id: str, data: Any, priority: int = DEFAULT_PRIORITY,
                  **options: Any) -> bool:  # fmt: skip
        """Enqueue a task unless a record of ``task_id`` exists at all, finished ones too
        (one atomic step): a schedule's tick is claimed by pushing its deterministic id."""
        task = replace(self._new_task(task_id, data, priority, options), unique=True)
        return self._store.enqueue([task]).stored[0]

    def submit(
        self,
        data: Any,
        *,
        priority: int = DEFAULT_PRIORITY,
        task_id: str | None = None,
        **options: Any,
    ) -> str | None:
        """Enqueue one task and return its id (generated when omitted); None if a duplicate."""
        task_id = task_id if task_id is not None else uuid.uuid4().hex
        return task_id if self.push(task_id, data, priority, **options) else None

    def push_many(self, tasks: Iterable[Mapping[str, Any] | tuple[Any, ...]]) -> list[bool]:
        """Enqueue a batch in one round trip; one bool per task as ``push`` returns.

        Items are ``(task_id, data, priority)`` tuples or mappings with ``push``'s keyword
        names (``task_id``, ``data``, ``priority``, ``type``, ``delay``...). Every item is
        validated before any is written: one bad item rejects the batch, naming its index.
        """
        batch = self._validated(tasks)
        return self._store.enqueue(batch).stored if batch else []

    def check_many(self, tasks: Iterable[Mapping[str, Any] | tuple[Any, ...]]) -> int:
        """Validate items as ``push_many`` would, writing nothing; returns how many.

        Lets a bulk push from a file reject a bad line before the first batch is written.
        """
        return len(self._validated(tasks))

    def _validated(self, tasks: Iterable[Mapping[str, Any] | tuple[Any, ...]]) -> list[NewTask]:
        batch: list[NewTask] = []
        for index, item in enumerate(tasks):
            try:
                batch.append(self._new_task_from_item(item))
            except (TaskValidationError, TaskTypeError) as exc:
                raise type(exc)(f"tasks[{index}].{exc.field}", exc.reason) from None
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"tasks[{index}].{exc}") from None
        return batch

    def _new_task_from_item(self, item: Mapping[str, Any] | tuple[Any, ...]) -> NewTask:
        if isinstance(item, tuple):
            if not 2 <= len(item) <= 3:
                raise TypeError("must be a (task_id, data) or (task_id, data, priority) tuple")
            return self._new_task(item[0], item[1], item[2] if len(item) == 3 else DEFAULT_PRIORITY)
        options = dict(item)
        task_id, data = options.pop("task_id", None), options.pop("data", None)
        return self._new_task(task_id, data, options.pop("priority", DEFAULT_PRIORITY), options)

    def _new_task(
        self, task_id: Any, data: Any, priority: Any, options: Mapping[str, Any] | None = None
    ) -> NewTask:
        """Validate and encode one task; raises naming the first bad field."""
        options = options or {}
        unknown = set(options) - _TASK_OPTIONS
        if unknown:
            raise TypeError(f"{sorted(unknown)[0]}: unknown task option; see QueueManager.push")
        return NewTask(
            task_id=check_task_id(uuid.uuid4().hex if task_id is None else task_id),
            priority=check_priority(priority, self.max_priority),
            data_json=encode_json("data", data, self.max_payload_bytes, self.max_json_depth),
            type=check_type_name(options.get("type")),
            delay=delay_from(options.get("delay"), options.get("eta")),
            max_retries=check_optional_count("max_retries", options.get("max_retries")),
            retry_backoff=encode_backoff(
                check_backoff("retry_backoff", options.get("retry_backoff"))
            ),
            queue_timeout=check_seconds(
                "queue_timeout", options.get("queue_timeout"), allow_zero=False
            ),
            process_timeout=check_seconds(
                "process_timeout", options.get("process_timeout"), allow_zero=False
            ),
            **key_fields(
                options.get("concurrency_key"), options.get("max_concurrency"),
                self.key_limits, self.backend_kind,
            ),
        )  # fmt: skip

    # -- consuming --------------------------------------------------------------------------

    def pull(self, timeout: float | None = 0) -> Message | None:
        """Take the most urgent task and consume it at once (at-most-once), or None.

        Blocks up to ``timeout`` seconds (None: until a task arrives). The task is marked
        processing and never redelivered; ``ack``/``nack`` on it only record the outcome.
        """
        return self._take(None, timeout)

    def reserve(
        self, timeout: float | None = 0, *, min_priority: int | None = None
    ) -> Message | None:
        """Lease the most urgent task (at-least-once), or None after ``timeout`` seconds.

        The lease lasts ``visibility_timeout`` seconds; ``extend`` renews it. Settle with
        ``ack`` or ``nack``; if the consumer dies, the task is delivered again.
        ``min_priority`` takes the head of the line only if its declared priority is at
        least that (a worker's reserved slot).
        """
        return self._take(self.visibility_timeout, timeout, min_priority)

    def _take(
        self, lease: float | None, timeout: float | None, min_priority: int | None = None
    ) -> Message | None:
        wait_for = math.inf if timeout is None else check_seconds("timeout", timeout) or 0.0
        deadline = time.monotonic() + wait_for
        while True:
            result = self._store.claim(self._spec(lease, min_priority=min_priority))
            messages = self._messages(result, lease is not None)
            if messages:
                return messages[0]
            if result.claimed or result.skipped:
                continue  # malformed (dead-lettered now) or many retired: try again at once
            self.wait_hint = result.wait_hint
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            slice_ = min(remaining, _MAX_WAIT_SLICE)
            if result.wait_hint is not None:
                slice_ = min(slice_, max(result.wait_hint, 0.001))
            self._store.wait(slice_)
            if self._store.interrupted():
                return None  # the caller is stopping: not a wait to resume

    @property
    def interrupt_fd(self) -> int | None:
        """A file descriptor that ends a blocking ``reserve`` early once readable (a worker
        sets its signal pipe here, so a signal is acted on at once rather than when the
        block ends); None to wait the whole block. SQLite looks at it with each poll of
        the database; the other backends between their wait slices (up to a second)."""
        return self._store.interrupt_fd

    @interrupt_fd.setter
    def interrupt_fd(self, fd: int | None) -> None:
        self._store.interrupt_fd = fd

    def doorbell(self, seconds: float) -> int | None:
        """For a worker that must also watch its children: a file descriptor that becomes
        readable when a push may have made work ready, or after about ``seconds``. None
        when this backend has none. After it was readable, call ``heard_doorbell``."""
        return self._store.doorbell(seconds)

    @property
    def has_doorbell(self) -> bool:
        """``doorbell`` gives a file descriptor to wait on (Redis, PostgreSQL, RabbitMQ)."""
        return self._store.has_doorbell

    @property
    def settles_in_child(self) -> bool:
        """A forked child of this process may settle and claim on this manager itself."""
        return self._store.settles_in_child

    def release_held(self) -> None:
        """In a worker's child that settles by itself (``settles_in_child``), when the
        worker hands it a task or tells it so: what it claimed before was settled by the
        worker."""
        self._store.release_held()

    def settled_by_child(self, message: Message, accepted: bool) -> None:
        """In the worker: its child acked ``message`` itself (see worker/direct.py)."""
        self._store.settled_by_child(message.task_id, message.token, accepted)

    def heard_doorbell(self) -> None:
        self._store.heard_doorbell()

    def withdraw_doorbell(self) -> None:
        """The caller will not wait on the doorbell for a while: let other consumers have
        the wake-ups it would hold."""
        self._store.withdraw_doorbell()

    def _spec(
        self, lease: float | None, count: int = 1, min_priority: int | None = None
    ) -> ClaimSpec:
        return ClaimSpec(
            lease, self.max_deliveries, self.consumer_id, count=count, min_priority=min_priority
        )

    def _messages(self, result: ClaimResult, leased: bool) -> list[Message]:
        """The claimed tasks as messages; malformed ones are dead-lettered and left out."""
        decoded = (self._decode(claimed, leased) for claimed in result.claimed)
        return [message for message in decoded if message is not None]

    def _decode(self, claimed: Claimed, leased: bool) -> Message | None:
        """Turn a claimed entry into a Message, dead-lettering it if it is malformed."""
        try:
            # Every field is read and checked just here (the strict helpers below), so
            # pydantic's validation would only repeat it, once per task on the hot path.
            return Message.model_construct(
                task_id=claimed.task_id,
                data=decode_json("data", claimed.data_json, self.max_json_depth),
                priority=strict_int(claimed.priority),
                queue=self.queue_name,
                type=claimed.type or None,
                attempts=claimed.attempts,
                max_retries=None if claimed.max_retries in (None, "") else int(claimed.max_retries),
                retry_backoff=decode_backoff(claimed.retry_backoff),
                process_timeout=optional_float(claimed.process_timeout),
                created_at=optional_float(claimed.created_at) or 0.0,
                steps=steps_from(claimed.steps_json, self.max_json_depth),
                token=claimed.token,
                leased=leased,
            )
        except (ValueError, TypeError, OverflowError) as exc:
            reason = f"malformed entry: {type(exc).__name__}: {exc}"
            logger.warning(
                "queue {} task {}: {}; dead-lettered", self.queue_name, claimed.task_id, reason
            )
            error = {"type": "MalformedTask", "message": reason, "traceback": None}
            self._apply(build.fail(claimed.task_id, None, reason=DeadReason.MALFORMED, error=error))
            return None

    # -- settling ---------------------------------------------------------------------------

    def settle(
        self, outcomes: Sequence[Outcome], claim: int = 0, min_priority: int | None = None
    ) -> tuple[list[Settled], list[Message]]:
        """Apply outcomes and lease up to ``claim`` more tasks, in one round trip.

        The worker's hot path: the results of every slot that finished, and the claims for
        every slot that is free, in one atomic step (no blocking). ``min_priority``: as for
        ``reserve`` (claims for reserved slots).
        """
        then = None
        if claim > 0:
            then = self._spec(self.visibility_timeout, claim, min_priority)
        settled, result = self._store.settle(outcomes, then)
        messages = self._messages(result, True) if result is not None else []
        more_wanted = result is not None and (result.claimed or result.skipped)
        if then is not None and len(messages) < claim and more_wanted:
            try:
                more = self._store.claim(replace(then, count=claim - len(messages)))
            except BrokerUnavailableError:
                return settled, messages  # the outcomes counted; the next call meets the outage
            messages += self._messages(more, True)
        return settled, messages

    def ack(self, message: Message, result: Any = None) -> bool:
        """Finish a task as ``success``; False if its lease was lost to another consumer."""
        return self._apply(build.ack(message, result, self.max_payload_bytes, self.max_json_depth))

    def ack_and_reserve(self, message: Message, result: Any = None) -> tuple[bool, Message | None]:
        """Ack ``message`` and lease the next task in the same round trip (no blocking)."""
        outcome = build.ack(message, result, self.max_payload_bytes, self.max_json_depth)
        settled, following = self.settle([outcome], claim=1)
        return settled[0].status is not None, following[0] if following else None

    def nack(
        self,
        message: Message,
        delay: float = 0,
        *,
        error: ErrorLike = None,
        count_attempt: bool = True,
    ) -> bool:
        """Give a task back: ready again after ``delay`` seconds, at its priority.

        ``count_attempt=False`` returns the delivery too (a shutdown hand-back is not a try).
        False if the lease was lost.
        """
        return self._apply(build.nack(message, delay, error=error, count_attempt=count_attempt))

    def fail(
        self, message: Message | str, *, reason: str = "error", error: ErrorLike = None
    ) -> bool:
        """Dead-letter a task: status ``failed`` with ``reason``; kept for ``dead`` listing.

        With a Message, only while its lease is held; with a task id, whatever its state.
        """
        if isinstance(message, Message):
            task_id, token = message.task_id, message.token
        else:
            task_id, token = check_task_id(message), None
        return self._apply(build.fail(task_id, token, reason=reason, error=error))

    def settle_canceled(self, message: Message, *, error: ErrorLike = None) -> bool:
        """Finish a running task whose cancel was asked as ``canceled`` (not dead-lettered)."""
        outcome = build.fail(
            message.task_id, message.token, reason="canceled", error=error, canceled=True
        )
        return self._apply(outcome)

    def checkpoint(self, message: Message, steps: Mapping[str, Any]) -> bool:
        """Store finished steps' results so a retry of this task resumes after them."""
        return self._apply(
            build.checkpoint(message, steps, self.max_payload_bytes, self.max_json_depth)
        )

    def extend(self, message: Message, seconds: float | None = None) -> bool:
        """Renew a lease for ``seconds`` (default ``visibility_timeout``) from now; False
        once the lease is lost (a pulled task, which has none, stays held: True)."""
        lease = check_seconds("seconds", seconds, allow_zero=False) or self.visibility_timeout
        return self._store.renew([(message.task_id, message.token)], lease)[0].held

    def renew(self, messages: Sequence[Message], extend: bool) -> list[LeaseState]:
        """For each held message: still held, cancel asked? ``extend`` also renews the
        leases for ``visibility_timeout``. One round trip for all of them."""
        leases = [(message.task_id, message.token) for message in messages]
        return self._store.renew(leases, self.visibility_timeout if extend else None)

    def head(self) -> Head | None:
        """The task at the head of the line (its declared priority and ready time), or None
        when nothing is ready: one cheap read, for a busy worker's preemption check."""
        return self._store.head()

    def preempt(
        self,
        message: Message,
        steps: Mapping[str, Any],
        *,
        min_priority: int,
        max_preemptions: int,
    ) -> tuple[bool, Message | None]:
        """Yield a running task at a step boundary and lease the urgent task instead.

        One atomic step: the yielded task goes back to its original place with ``steps``
        as its checkpoint and its attempt returned, and the most urgent ready task — only
        if its declared priority is at least ``min_priority`` — is leased to this consumer.
        Returns (yielded, the urgent task's message). (False, None): nothing changed — no
        such task is ready, the running task was preempted ``max_preemptions`` times
        already, a cancel was asked, or its lease is lost. (True, None) is rare: the urgent
        record proved unreadable once taken (dead-lettered); the yield stands.
        """
        steps_json = build.checkpoint(
            message, steps, self.max_payload_bytes, self.max_json_depth
        ).payload
        yielded = Preempt(message.task_id, message.token, steps_json, min_priority, max_preemptions)
        settled, result = self._store.preempt(yielded, self._spec(self.visibility_timeout))
        if settled.status is None:
            return False, None
        messages = self._messages(result, True)
        return True, messages[0] if messages else None

    def sweep(self) -> None:
        """Maintenance: time out expired waiting tasks, reap lost leases, apply retention."""
        self._store.sweep()

    def set_progress(self, message: Message, fraction: float, note: str | None = None) -> bool:
        """Record progress 0..1 of a leased task, visible in its record."""
        return self._apply(build.progress(message, fraction, note))

    def _apply(self, outcome: Outcome) -> bool:
        """Send one outcome; False when fencing refused it (the lease is not ours)."""
        settled, _ = self._store.settle([outcome])
        return settled[0].status is not None

    # -- inspecting and managing ------------------------------------------------------------

    def get_queue_length(self) -> int:
        """Tasks ready to run now (pending); scheduled and processing ones are not counted."""
        return self._records.size()

    def clear(self) -> int:
        """Delete every task of this queue in every state; returns how many were pending."""
        pending = self._store.purge()
        self.server.registry.forget_queue(self.queue_name)
        return pending

    def get_task(self, task_id: str) -> TaskRecord | None:
        """The task's record (status, attempts, progress, result, error, history) or None."""
        row = self._records.get(check_task_id(task_id))
        return None if row is None else record_from_row(row, self.queue_name, time.time())

    def require_task(self, task_id: str) -> TaskRecord:
        """Like ``get_task`` but raises ``TaskNotFoundError`` naming the id and queue."""
        record = self.get_task(task_id)
        if record is None:
            raise TaskNotFoundError(f"no task {task_id!r} in queue {self.queue_name!r}")
        return record

    # -- live events (conveyor.events) -------------------------------------------------------

    def event_log(self) -> EventLog:
        """This queue's event log (opened once per manager)."""
        if self._events is None:
            self._events = self.server.events(self.queue_name)
        return self._events

    def events(self, task_id: str | None = None, since: str | None = None) -> Iterator[LiveEvent]:
        """Every event of this queue (or of one task) after the log id ``since`` (None: from
        now), as it happens. Blocks on the backend's wake-up; never ends by itself. A
        ``reset`` event means events were trimmed before they were read: re-read the state."""
        from .events.waiting import iter_events

        return iter_events(self.event_log(), task_id, since)

    def wait(self, task_id: str, timeout: float | None = None) -> TaskRecord | None:
        """The task's final record as soon as it exists; None after ``timeout`` seconds."""
        from .events.waiting import wait_for

        task_id = check_task_id(task_id)
        return wait_for(self.event_log(), lambda: self.get_task(task_id), task_id, timeout)

    def cancel(self, task_id: str) -> bool:
        """Cancel a scheduled or pending task now, or a running one between its steps."""
        return self._store.cancel(check_task_id(task_id))

    def retry(self, task_id: str) -> bool:
        """Re-drive a failed, timed-out or canceled task: pending again with attempts reset."""
        return self._store.retry(check_task_id(task_id)) is not None

    def delete_finished(
        self, status: TaskStatus | str = TaskStatus.FAILED, limit: int = 1000
    ) -> int:
        """Delete up to ``limit`` finished records with ``status``, oldest first; how many.

        ``failed`` purges the dead-letter list. Bounded per call: repeat until it returns 0.
        """
        wanted = TaskStatus(status)
        if wanted not in FINISHED_STATUSES:
            raise ValueError(
                f"status: only finished tasks can be deleted (success, failed, canceled, "
                f"timeout), got {wanted.value!r}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit: must be an integer >= 1, got {limit!r}")
        return self._store.purge_finished(wanted.value, limit)

    def list_tasks(
        self, status: TaskStatus | str | None = None, limit: int = 50, offset: int = 0
    ) -> list[TaskRecord]:
        """Records with ``status`` (all if None): pending in run order, others newest first."""
        wanted = None if status is None else TaskStatus(status).value
        if limit < 0 or offset < 0:
            raise ValueError("limit/offset: must be >= 0")
        rows = self._records.list(wanted, limit, offset)
        now = time.time()
        records = [record_from_row(row, self.queue_name, now) for row in rows]
        # A waiting task past its queue_timeout shows as timeout before a sweep writes it:
        # it is no longer listed as pending (see lifecycle.effective_status). One whose
        # status is damaged stays listed where its index holds it, shown as damaged.
        return [
            r
            for r in records
            if wanted is None
            or r.status.value == wanted
            or any(line.startswith("status:") for line in r.damage)
        ]

    def stats(self) -> QueueStats:
        """Counts per status, successes and failures in the last minute, mean run time."""
        done, failed, mean = self._records.recent(60.0)
        now = self._records.now()
        waiting = [
            WaitingBand(priority=priority, count=count, oldest_seconds=max(0.0, now - ready))
            for priority, count, ready in self._records.waiting()
        ]
        return QueueStats(
            queue=self.queue_name,
            counts=self._records.counts(),
            done_last_minute=done,
            failed_last_minute=failed,
            mean_run_seconds=mean if mean is not None and math.isfinite(mean) else None,
            waiting=waiting,
            preemptions=self._records.preemptions(),
        )

    def known_queues(self) -> list[str]:
        """Every queue on this backend (for ``conveyor queues`` and status of all queues).

        A name no queue may have (written by hand: control characters, invalid UTF-8) is
        left out with a warning, so one damaged name cannot break every listing."""
        names = []
        for name in self.server.registry.known_queues():
            try:
                names.append(check_queue_name(name))
            except (TaskValidationError, TaskTypeError) as exc:
                logger.warning("queue list: a damaged queue name is left out ({})", exc)
        return names

    # -- the worker registry ------------------------------------------------------------------

    def register_worker(self, worker_id: str, info: Mapping[str, Any], ttl: float) -> bool:
        """Heartbeat: record a live worker for ``ttl`` seconds; True if it was asked to stop."""
        info_json = encode_json("info", dict(info), self.max_payload_bytes, self.max_json_depth)
        worker = check_name("worker_id", worker_id)
        return self.server.registry.register_worker(worker, info_json, ttl)

    def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker that exits cleanly."""
        self.server.registry.unregister_worker(worker_id)

    def workers(self) -> list[dict[str, Any]]:
        """Live workers on this backend (any queue), as their heartbeats describe them.

        Each is decoded by ``heartbeat_from``: known keys only, safe values, and a
        ``damage`` list naming what could not be read (a damaged entry is shown as such).
        """
        return [heartbeat_from(info) for info in self.server.registry.list_workers()]

    def request_stop(self, worker_id: str | None = None) -> int:
        """Ask one worker (or all) to shut down gracefully, across hosts; how many asked."""
        return self.server.registry.request_stop(worker_id)

    def check_time_limit(self, seconds: float | None, what: str) -> None:
        """Raise ``ConfigError`` (naming ``what`` and both values) when the backend would cut
        a run of ``seconds`` short: RabbitMQ redelivers a task whose delivery stays unacked
        past its ``consumer_timeout``. A worker checks its pipelines' hard limits at start."""
        self.server.check_time_limit(seconds, what)

    def ping(self) -> None:
        """Raise ``BrokerUnavailableError`` unless the backend answers."""
        self.server.ping()

    def close(self) -> None:
        """Release the manager; the server's connections close with the last manager on
        them. The manager cannot be used afterwards. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._events is not None:
                self._events.close()
            self._store.close()
        finally:
            self._shared.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"QueueManager({self.backend_kind.value}, queue={self.queue_name!r}, url={self.url!r})"
        )


def _check_tuning(
    visibility_timeout: float,
    max_deliveries: int,
    max_priority: int,
    max_payload_bytes: int,
    max_json_depth: int,
) -> None:
    if (
        isinstance(visibility_timeout, bool)
        or not isinstance(visibility_timeout, int | float)
        or not 0 < visibility_timeout < math.inf
    ):
        raise ConfigError(f"visibility_timeout: must be seconds > 0, got {visibility_timeout!r}")
    for name, value, low, high in (
        ("max_deliveries", max_deliveries, 1, 1000),
        ("max_priority", max_priority, 1, 255),
        ("max_payload_bytes", max_payload_bytes, 1, 512 * 1024 * 1024),
        ("max_json_depth", max_json_depth, 1, MAX_JSON_DEPTH),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{name}: must be an integer {low}..{high}, got {value!r}")


def _url_for(
    kind: QueueBackend,
    default: str,
    sqlite_path: str,
    redis_url: str | None,
    rabbitmq_url: str | None,
) -> str:
    """The URL the constructor's per-backend arguments name (the table gives defaults)."""
    if kind is QueueBackend.SQLITE:
        return f"sqlite:///{sqlite_path}"
    if kind is QueueBackend.REDIS:
        return redis_url or default
    if kind is QueueBackend.RABBITMQ:
        return rabbitmq_url or default
    return default


def _store_option(settings: Settings) -> dict[str, Any]:
    """``task_store`` for a RabbitMQ URL when the settings name one; ``durability`` for a
    Redis URL when the settings ask for it (other backends: none)."""
    kind = backend_for_url(settings.backend_url())
    store = settings.rabbitmq.task_store
    if store and kind is QueueBackend.RABBITMQ:
        return {"task_store": store}
    if settings.redis.durability is not None and kind is QueueBackend.REDIS:
        return {"durability": settings.redis.durability}
    return {}
