"""``QueueManager``: the producer's API and the worker's connection, on any backend.

The manager validates input, encodes JSON, decodes what backends hand out and loops on
blocking waits; the backend underneath only stores and moves tasks atomically (see
``backends.base``). That split is why the three backends behave the same.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from loguru import logger
from pydantic import BaseModel

from .backends import Backend, Claimed, ClaimResult, NewTask, QueueBackend, backend_for_url
from .backends import open_backend as _open_backend
from .codec import (
    ErrorLike,
    delay_from,
    error_json,
    note_text,
    optional_float,
    steps_from,
    strict_int,
    within_max_delay,
)
from .errors import ConfigError, TaskNotFoundError, TaskTypeError, TaskValidationError
from .heartbeat import heartbeat_from
from .models import FINISHED_STATUSES, Message, TaskRecord, TaskStatus
from .records import record_from_row
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
    {"type", "delay", "eta", "max_retries", "retry_backoff", "queue_timeout", "process_timeout"}
)


class QueueStats(BaseModel):
    """A queue's counts per status and its recent throughput."""

    queue: str
    counts: dict[str, int]
    done_last_minute: int
    failed_last_minute: int
    mean_run_seconds: float | None


class QueueManager:
    """One queue on one backend. Not thread-safe: give each thread its own manager.

    ``pull`` is at-most-once (the task is consumed as it is handed out, as in the seed);
    ``reserve`` is at-least-once (the task is leased for ``visibility_timeout`` seconds and
    comes back if the consumer dies before ``ack``/``nack``).
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
        max_json_depth: int = DEFAULT_JSON_DEPTH,
    ) -> None:
        kind = _check_backend(backend)
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
        url = _url_for(kind, sqlite_path, redis_url, rabbitmq_url)
        options: dict[str, Any] = {"result_ttl": result_ttl}
        if kind is QueueBackend.REDIS:
            options["connect_timeout"] = connect_timeout
        if kind is QueueBackend.RABBITMQ:
            # RabbitMQ keeps no task state: records live in a SQLite or Redis task store.
            options.update(
                connect_timeout=connect_timeout, max_priority=max_priority, task_store=task_store
            )
        elif task_store is not None:
            raise ConfigError("task_store: only the RabbitMQ backend uses a task store")
        self.backend_kind = kind
        #: Stored as the ``worker`` of each task this manager claims (a TaskWorker sets it).
        self.consumer_id = ""
        self._backend: Backend = _open_backend(kind, url, queue_name, options)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, queue_name: str = "default", **options: Any) -> Self:
        """Open the backend a URL names: ``sqlite:///path.db``, ``redis://``, ``amqp://``..."""
        kind = backend_for_url(url)
        if kind is QueueBackend.SQLITE:
            from .backends import sqlite_path_from_url

            return cls(
                kind, queue_name=queue_name, sqlite_path=sqlite_path_from_url(url), **options
            )
        if kind is QueueBackend.REDIS:
            return cls(kind, queue_name=queue_name, redis_url=url, **options)
        return cls(kind, queue_name=queue_name, rabbitmq_url=url, **options)

    @classmethod
    def from_settings(cls, settings: Settings, queue_name: str | None = None) -> Self:
        """Open the queue that validated settings (``config/*.yaml`` + env) describe."""
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
            **_store_option(settings),
        )

    @property
    def url(self) -> str:
        """The backend URL with its password masked."""
        return self._backend.safe_url

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
        retry_backoff: float | None = None,
        queue_timeout: float | None = None,
        process_timeout: float | None = None,
    ) -> bool:
        """Enqueue one task; True if stored, False if that id is already live.

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
        }
        task = self._new_task(task_id, data, priority, options)
        return self._backend.enqueue([task])[0]

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
        return self._backend.enqueue(batch) if batch else []

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
            retry_backoff=check_seconds("retry_backoff", options.get("retry_backoff")),
            queue_timeout=check_seconds(
                "queue_timeout", options.get("queue_timeout"), allow_zero=False
            ),
            process_timeout=check_seconds(
                "process_timeout", options.get("process_timeout"), allow_zero=False
            ),
        )

    # -- consuming --------------------------------------------------------------------------

    def pull(self, timeout: float | None = 0) -> Message | None:
        """Take the most urgent task and consume it at once (at-most-once), or None.

        Blocks up to ``timeout`` seconds (None: until a task arrives). The task is marked
        processing and never redelivered; ``ack``/``nack`` on it only record the outcome.
        """
        return self._take(None, timeout)

    def reserve(self, timeout: float | None = 0) -> Message | None:
        """Lease the most urgent task (at-least-once), or None after ``timeout`` seconds.

        The lease lasts ``visibility_timeout`` seconds; ``extend`` renews it. Settle with
        ``ack`` or ``nack``; if the consumer dies, the task is delivered again.
        """
        return self._take(self.visibility_timeout, timeout)

    def _take(self, lease: float | None, timeout: float | None) -> Message | None:
        wait_for = math.inf if timeout is None else check_seconds("timeout", timeout) or 0.0
        deadline = time.monotonic() + wait_for
        while True:
            result = self._backend.claim(lease, self.max_deliveries, consumer=self.consumer_id)
            message = self._first_message(result, lease is not None)
            if message is not None:
                return message
            if result.claimed is not None:
                continue  # it was malformed and is dead-lettered now: try the next one
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            slice_ = min(remaining, _MAX_WAIT_SLICE)
            if result.wait_hint is not None:
                slice_ = min(slice_, max(result.wait_hint, 0.001))
            self._backend.wait(slice_)

    def _first_message(self, result: ClaimResult, leased: bool) -> Message | None:
        if result.claimed is None:
            return None
        return self._decode(result.claimed, leased)

    def _decode(self, claimed: Claimed, leased: bool) -> Message | None:
        """Turn a claimed entry into a Message, dead-lettering it if it is malformed."""
        try:
            return Message(
                task_id=claimed.task_id,
                data=decode_json("data", claimed.data_json, self.max_json_depth),
                priority=strict_int(claimed.priority),
                queue=self.queue_name,
                type=claimed.type or None,
                attempts=claimed.attempts,
                max_retries=None if claimed.max_retries in (None, "") else int(claimed.max_retries),
                retry_backoff=optional_float(claimed.retry_backoff),
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
            self._backend.fail(
                claimed.task_id,
                None,
                "malformed",
                error_json({"type": "MalformedTask", "message": reason, "traceback": None}),
            )
            return None

    # -- settling ---------------------------------------------------------------------------

    def ack(self, message: Message, result: Any = None) -> bool:
        """Finish a task as ``success``; False if its lease was lost to another consumer."""
        return self._backend.ack(message.task_id, message.token, self._result_json(result))

    def ack_and_reserve(self, message: Message, result: Any = None) -> tuple[bool, Message | None]:
        """Ack ``message`` and lease the next task in the same round trip (no blocking)."""
        acked, result_ = self._backend.ack_and_claim(
            message.task_id,
            message.token,
            self._result_json(result),
            self.visibility_timeout,
            self.max_deliveries,
            consumer=self.consumer_id,
        )
        next_message = self._first_message(result_, True)
        if next_message is None and result_.claimed is not None:
            next_message = self.reserve(timeout=0)
        return acked, next_message

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
        seconds = within_max_delay("delay", check_seconds("delay", delay) or 0.0)
        return self._backend.nack(
            message.task_id, message.token, seconds, error_json(error), count_attempt
        )

    def fail(
        self, message: Message | str, *, reason: str = "error", error: ErrorLike = None
    ) -> bool:
        """Dead-letter a task: status ``failed`` with ``reason``; kept for ``dead`` listing.

        With a Message, only while its lease is held; with a task id, whatever its state.
        """
        if isinstance(message, Message):
            return self._backend.fail(message.task_id, message.token, reason, error_json(error))
        return self._backend.fail(check_task_id(message), None, reason, error_json(error))

    def settle_canceled(self, message: Message, *, error: ErrorLike = None) -> bool:
        """Finish a running task whose cancel was asked as ``canceled`` (not dead-lettered)."""
        return self._backend.fail(
            message.task_id, message.token, "canceled", error_json(error), status="canceled"
        )

    def checkpoint(self, message: Message, steps: Mapping[str, Any]) -> bool:
        """Store finished steps' results so a retry of this task resumes after them."""
        # One level more than a result: the object that holds the results by step name.
        steps_json = encode_json(
            "steps", dict(steps), self.max_payload_bytes, self.max_json_depth + 1
        )
        return self._backend.checkpoint(message.task_id, message.token, steps_json)

    def extend(self, message: Message, seconds: float | None = None) -> bool:
        """Renew a lease for ``seconds`` (default ``visibility_timeout``) from now."""
        lease = check_seconds("seconds", seconds, allow_zero=False) or self.visibility_timeout
        return self._backend.extend(message.task_id, message.token, lease)

    def set_progress(self, message: Message, fraction: float, note: str | None = None) -> bool:
        """Record progress 0..1 of a leased task, visible in its record."""
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0 <= fraction <= 1
        ):
            raise ValueError(f"fraction: must be a number between 0 and 1, got {fraction!r}")
        return self._backend.set_progress(
            message.task_id, message.token, float(fraction), note_text(note)
        )

    def _result_json(self, result: Any) -> str | None:
        if result is None:
            return None
        return encode_json("result", result, self.max_payload_bytes, self.max_json_depth)

    # -- inspecting and managing ------------------------------------------------------------

    def get_queue_length(self) -> int:
        """Tasks ready to run now (pending); scheduled and processing ones are not counted."""
        return self._backend.size()

    def clear(self) -> int:
        """Delete every task of this queue in every state; returns how many were pending."""
        return self._backend.purge()

    def get_task(self, task_id: str) -> TaskRecord | None:
        """The task's record (status, attempts, progress, result, error, history) or None."""
        row = self._backend.get(check_task_id(task_id))
        return None if row is None else record_from_row(row, self.queue_name)

    def require_task(self, task_id: str) -> TaskRecord:
        """Like ``get_task`` but raises ``TaskNotFoundError`` naming the id and queue."""
        record = self.get_task(task_id)
        if record is None:
            raise TaskNotFoundError(f"no task {task_id!r} in queue {self.queue_name!r}")
        return record

    def cancel(self, task_id: str) -> bool:
        """Cancel a scheduled or pending task now, or a running one between its steps."""
        return self._backend.cancel(check_task_id(task_id))

    def retry(self, task_id: str) -> bool:
        """Re-drive a failed, timed-out or canceled task: pending again with attempts reset."""
        return self._backend.retry(check_task_id(task_id))

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
        return self._backend.purge_finished(wanted.value, limit)

    def list_tasks(
        self, status: TaskStatus | str | None = None, limit: int = 50, offset: int = 0
    ) -> list[TaskRecord]:
        """Records with ``status`` (all if None): pending in run order, others newest first."""
        wanted = None if status is None else TaskStatus(status).value
        if limit < 0 or offset < 0:
            raise ValueError("limit/offset: must be >= 0")
        rows = self._backend.list(wanted, limit, offset)
        return [record_from_row(row, self.queue_name) for row in rows]

    def stats(self) -> QueueStats:
        """Counts per status, successes and failures in the last minute, mean run time."""
        done, failed, mean = self._backend.recent(60.0)
        return QueueStats(
            queue=self.queue_name,
            counts=self._backend.counts(),
            done_last_minute=done,
            failed_last_minute=failed,
            mean_run_seconds=mean if mean is not None and math.isfinite(mean) else None,
        )

    def known_queues(self) -> list[str]:
        """Every queue on this backend (for ``conveyor queues`` and status of all queues).

        A name no queue may have (written by hand: control characters, invalid UTF-8) is
        left out with a warning, so one damaged name cannot break every listing."""
        names = []
        for name in self._backend.known_queues():
            try:
                names.append(check_queue_name(name))
            except (TaskValidationError, TaskTypeError) as exc:
                logger.warning("queue list: a damaged queue name is left out ({})", exc)
        return names

    # -- the worker registry ------------------------------------------------------------------

    def register_worker(self, worker_id: str, info: Mapping[str, Any], ttl: float) -> bool:
        """Heartbeat: record a live worker for ``ttl`` seconds; True if it was asked to stop."""
        info_json = encode_json("info", dict(info), self.max_payload_bytes, self.max_json_depth)
        return self._backend.register_worker(check_name("worker_id", worker_id), info_json, ttl)

    def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker that exits cleanly."""
        self._backend.unregister_worker(worker_id)

    def workers(self) -> list[dict[str, Any]]:
        """Live workers on this backend (any queue), as their heartbeats describe them.

        Each is decoded by ``heartbeat_from``: known keys only, safe values, and a
        ``damage`` list naming what could not be read (a damaged entry is shown as such).
        """
        return [heartbeat_from(info) for info in self._backend.list_workers()]

    def request_stop(self, worker_id: str | None = None) -> int:
        """Ask one worker (or all) to shut down gracefully, across hosts; how many asked."""
        return self._backend.request_stop(worker_id)

    def check_time_limit(self, seconds: float | None, what: str) -> None:
        """Raise ``ConfigError`` (naming ``what`` and both values) when the backend would cut
        a run of ``seconds`` short: RabbitMQ redelivers a task whose delivery stays unacked
        past its ``consumer_timeout``. A worker checks its pipelines' hard limits at start."""
        self._backend.check_time_limit(seconds, what)

    def ping(self) -> None:
        """Raise ``BrokerUnavailableError`` unless the backend answers."""
        self._backend.ping()

    def close(self) -> None:
        """Release the backend's connections; the manager cannot be used afterwards."""
        self._backend.close()

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


def _check_backend(backend: QueueBackend | str) -> QueueBackend:
    try:
        return QueueBackend(backend)
    except ValueError:
        choices = ", ".join(kind.value for kind in QueueBackend)
        raise ConfigError(
            f"backend: unknown backend {backend!r}; choose one of {choices}"
        ) from None


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
    kind: QueueBackend, sqlite_path: str, redis_url: str | None, rabbitmq_url: str | None
) -> str:
    if kind is QueueBackend.SQLITE:
        return f"sqlite:///{sqlite_path}"
    if kind is QueueBackend.REDIS:
        return redis_url or "redis://localhost:6379/0"
    return rabbitmq_url or "amqp://guest:guest@localhost:5672/"


def _store_option(settings: Settings) -> dict[str, Any]:
    """``task_store`` for a RabbitMQ URL when the settings name one (other backends: none)."""
    store = settings.rabbitmq.task_store
    if store and backend_for_url(settings.backend_url()) is QueueBackend.RABBITMQ:
        return {"task_store": store}
    return {}
