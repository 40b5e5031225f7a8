"""``TaskWorker``: the daemon loop that takes tasks, runs them in child processes, settles them.

One thread does everything — reserve, dispatch, collect results, renew leases, heartbeat —
so children can be forked safely and signal handlers only set flags (the loop acts on
them). Steps run in ``concurrency`` long-lived child processes: a crash, a leak or a hang
costs one child, which is replaced; the worker and its leases carry on.

Shutdown is an ordered sequence, one log line per step: stop taking work (at once), wait
for running tasks up to ``max_shutdown_wait`` while leases keep being renewed, hand back
(or fail, by ``shutdown_mode``) what is still running, stop the children, unregister.
A second signal skips the wait.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from multiprocessing.connection import wait as wait_for_ready
from types import FrameType
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    from loguru import Logger

from ..errors import ConfigError, ConveyorError, TaskTypeError, TaskValidationError
from ..manager import QueueManager
from ..models import Message
from ..pipeline import PipelineService
from ..validation import check_name
from .options import WorkerOptions
from .policy import backoff_seconds, should_retry
from .slots import Slot
from .usage import resident_mb

_CANCEL_POLL = 1.0  # seconds between checks of running tasks' cancel flags (one call a queue)
_SWEEP_INTERVAL = 5.0  # seconds between maintenance sweeps (timeouts, lost leases, retention)
_BUSY_POLL = 0.05  # longest wait for results while a slot is free and the queue is empty


class TaskWorker:
    """Run tasks from one or more queues (strict priority: the first queue always wins).

    ``start()`` blocks until the worker stops (a signal, ``conveyor stop``, a recycling
    limit) and returns normally, so ``python worker.py`` exits 0 and supervisor restarts it.
    """

    def __init__(
        self,
        queue_manager: QueueManager | Sequence[QueueManager],
        pipeline_service: PipelineService,
        max_shutdown_wait: float = 300.0,
        *,
        concurrency: int = 1,
        options: WorkerOptions | None = None,
    ) -> None:
        self.queues = (
            [queue_manager] if isinstance(queue_manager, QueueManager) else list(queue_manager)
        )
        if not self.queues:
            raise ConfigError("worker.queues: give the worker at least one queue")
        if concurrency < 1:
            raise ConfigError(f"worker.concurrency: must be >= 1, got {concurrency}")
        self.service = pipeline_service
        self.max_shutdown_wait = max_shutdown_wait
        self.concurrency = concurrency
        self.options = options or WorkerOptions()
        self.id = self.options.worker_id or (
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        try:
            check_name("worker id", self.id)
        except (TaskValidationError, TaskTypeError) as exc:
            raise ConfigError(str(exc)) from None
        self.processed = 0
        self.failed = 0
        self.stop_reason: str | None = None
        self._force = False
        self._drain_deadline = 0.0
        self._started = time.time()
        self._slots: list[Slot] = []
        self._next_heartbeat = 0.0
        self._next_renewal = 0.0
        # How often running tasks are looked at: for cancel flags every second, and often
        # enough that a lease is renewed well inside its visibility timeout.
        self._renewal_period = min(
            _CANCEL_POLL,
            *(self.options.renew_check_period(q.visibility_timeout) for q in self.queues),
        )
        self._next_sweep = 0.0
        self._signals: list[int] = []  # signals received, logged by the loop
        self._signals_logged = 0
        self._shutdown_flag = multiprocessing.get_context("fork").Value("b", 0)

    # -- public ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run until asked to stop; then drain, hand back what is unfinished and return.

        Raises ConfigError before taking any task when a pipeline's hard time limit is longer
        than a backend lets a task run (RabbitMQ's consumer_timeout).
        """
        for queue in self.queues:
            queue.consumer_id = self.id
            for pipeline in self.service.pipelines.values():
                queue.check_time_limit(pipeline.hard_limit(), f"pipeline {pipeline.name!r}")
        previous = self._install_signal_handlers()
        context = multiprocessing.get_context("fork")
        self._slots = [
            Slot(i, context, self.service, self._shutdown_flag) for i in range(self.concurrency)
        ]
        names = ",".join(queue.queue_name for queue in self.queues)
        logger.info(
            "worker {} started: queues={} concurrency={} backend={} pid={}",
            self.id, names, self.concurrency, self.queues[0].url, os.getpid(),
        )  # fmt: skip
        try:
            self._loop()
        finally:
            self._finish()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def stop(self, reason: str = "requested") -> None:
        """Begin a graceful shutdown (what SIGTERM does); safe to call from a signal handler."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self._drain_deadline = time.monotonic() + self.max_shutdown_wait
            self._shutdown_flag.value = 1
        else:
            self._force = True

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._log_signals()
            self._maintain()
            busy = [slot for slot in self._slots if slot.busy]
            if self.stop_reason is not None:
                if not busy:
                    return
                if self._force or time.monotonic() >= self._drain_deadline:
                    self._interrupt(busy)
                    return
                self._collect(busy, timeout=0.2)
                continue
            free = next((slot for slot in self._slots if not slot.busy), None)
            if free is None:
                self._collect(busy, timeout=self._idle_wait())
                continue
            found = self._reserve(0.0 if busy else self.options.idle_block)
            if found is not None:
                self._dispatch(free, *found)
            elif busy:
                self._collect(busy, timeout=_BUSY_POLL)

    def _reserve(self, block: float) -> tuple[Message, QueueManager] | None:
        """The most urgent task across queues; blocks up to ``block`` on the first queue."""
        for queue in self.queues:
            message = queue.reserve(timeout=0)
            if message is not None:
                return message, queue
        if block <= 0:
            return None
        slice_ = block if len(self.queues) == 1 else min(block, 0.1)
        message = self.queues[0].reserve(timeout=slice_)
        return None if message is None else (message, self.queues[0])

    def _dispatch(self, slot: Slot, message: Message, queue: QueueManager) -> None:
        if self.stop_reason is not None:  # the signal came while we were blocked: give it back
            queue.nack(message, count_attempt=False)
            self._log(message).info("handed back at once: shutting down")
            return
        slot.start(message, queue, self.service)
        self._log(message).info("started")

    def _collect(self, busy: list[Slot], timeout: float) -> None:
        """Wait for replies from busy children (or their death) and act on them."""
        waitables: list[Any] = [slot.conn for slot in busy] + [
            slot.process.sentinel for slot in busy
        ]
        ready = set(wait_for_ready(waitables, timeout))
        for slot in busy:
            if slot.conn in ready:
                self._read_replies(slot)
            elif slot.process.sentinel in ready and slot.busy:
                self._child_died(slot)

    def _read_replies(self, slot: Slot) -> None:
        while slot.busy and slot.conn.poll():
            try:
                reply = _decode(slot.conn.recv_bytes())
            except (EOFError, OSError):
                self._child_died(slot)
                return
            self._on_reply(slot, reply)

    def _on_reply(self, slot: Slot, reply: dict[str, Any]) -> None:
        task = slot.task
        assert task is not None
        op = reply.get("op")
        if op == "progress":
            fraction, note = reply.get("fraction"), reply.get("message")
            try:
                task.queue.set_progress(task.message, float(fraction), note)  # type: ignore[arg-type]
            except (ValueError, TypeError) as exc:  # advisory: never worth a crash
                self._log(task.message).warning("progress not recorded: {}", exc)
        elif op == "step":
            task.steps[str(reply["name"])] = reply.get("result")
            task.step_started = time.monotonic()
            try:
                task.queue.checkpoint(task.message, task.steps)
            except (TaskValidationError, TaskTypeError) as exc:
                # The results so far cannot be stored (together over the size limit): the
                # child is on the next step already; stop it and fail the task, recorded.
                slot.kill()
                self._failed(slot, "invalid_result", _refused(exc), str(reply["name"]))
                return
            self._log(task.message).info("step {} done", reply["name"])
        elif op == "done":
            self._succeeded(slot, reply.get("result"))
        elif op == "error":
            self._failed(slot, str(reply.get("reason", "error")), reply, reply.get("step"))

    # -- settling --------------------------------------------------------------------------

    def _succeeded(self, slot: Slot, result: Any) -> None:
        task = slot.task
        assert task is not None
        self.processed += 1  # counted first: reaching max_jobs means no next task is taken
        elapsed = time.monotonic() - task.started
        single = len(self.queues) == 1 and self.stop_reason is None and not self._limit_reached()
        try:  # the result is checked before anything is written
            if single:
                acked, following = task.queue.ack_and_reserve(task.message, result)
            else:
                acked, following = task.queue.ack(task.message, result), None
        except (TaskValidationError, TaskTypeError) as exc:
            self.processed -= 1  # _failed counts it
            self._failed(slot, "invalid_result", _refused(exc), None)
            return
        slot.task = None
        log = self._log(task.message)
        if acked:
            log.info("succeeded in {:.3f}s", elapsed)
        else:
            log.warning(
                "finished in {:.3f}s but its lease was lost; the result was refused", elapsed
            )
        self._check_limits()
        if following is not None:
            self._dispatch(slot, following, task.queue)

    def _failed(self, slot: Slot, reason: str, error: dict[str, Any], step: Any) -> None:
        task = slot.task
        assert task is not None
        slot.task = None
        message, queue = task.message, task.queue
        details = {key: error.get(key) for key in ("type", "message", "traceback")}
        log = self._log(message)
        if reason == "canceled" or slot.cancel_flag.value:
            # A step that raised because it saw ctx.cancelled was canceled, not broken.
            queue.settle_canceled(message, error=details)
            log.info("canceled")
        elif self.stop_reason is not None and reason == "error":
            # A step that stopped early because it saw ctx.shutting_down: that is the
            # shutdown's doing, so the task is handed back (or failed) as the mode says.
            self._hand_back(message, queue)
        elif should_retry(message, task.pipeline, step, reason, self.options.retry):
            delay = backoff_seconds(message, task.pipeline, step, self.options.retry)
            queue.nack(message, delay=delay, error=details)
            log.warning("retry in {:.1f}s after {}: {}", delay, details["type"], details["message"])
        else:
            self.failed += 1
            queue.fail(message, reason=reason, error=details)
            log.error("failed ({}): {}: {}", reason, details["type"], details["message"])
        self.processed += 1
        self._check_limits()

    def _child_died(self, slot: Slot) -> None:
        # The pipe can close before the exit status is known: reap the child first.
        slot.process.join(5)
        code = slot.process.exitcode
        slot.kill()  # start a fresh child
        error = {
            "type": "WorkerCrashed",
            "message": f"the step's process died (exit code {code}); a new one was started",
            "traceback": None,
        }
        self._failed(slot, "crashed", error, slot.task.current_step() if slot.task else None)

    def _interrupt(self, busy: list[Slot]) -> None:
        """The grace period is over: stop running steps and hand their tasks back (or fail)."""
        logger.warning("shutdown: {} task(s) still running after the wait; interrupting", len(busy))
        for slot in busy:
            task = slot.task
            assert task is not None
            slot.process.kill()
            slot.process.join(5)
            slot.task = None
            self._hand_back(task.message, task.queue)

    def _hand_back(self, message: Message, queue: QueueManager) -> None:
        """A task the shutdown interrupted: back in line without using a retry, or failed."""
        if self.options.shutdown_mode == "fail":
            error = {"type": "WorkerShutdown", "message": "the worker shut down", "traceback": None}
            queue.fail(message, reason="shutdown", error=error)
            self._log(message).warning("failed: shutdown")
        else:
            queue.nack(message, count_attempt=False)
            self._log(message).warning("interrupted: handed back to the queue")

    # -- upkeep ----------------------------------------------------------------------------

    def _maintain(self) -> None:
        """Enforce time limits, renew leases and pass on cancels, sweep, heartbeat, check
        recycling."""
        now = time.monotonic()
        for slot in self._slots:
            task = slot.task
            if task is None:
                if not slot.process.is_alive():
                    slot.kill()
                continue
            deadline = task.deadline()
            if deadline is not None and now > deadline:
                self._time_limit(slot)
        if now >= self._next_renewal:
            self._next_renewal = now + self._renewal_period
            self._renew(now)
        if now >= self._next_sweep and self.stop_reason is None:
            self._next_sweep = now + _SWEEP_INTERVAL
            for queue in self.queues:
                queue.sweep()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.options.heartbeat_interval
            self._heartbeat()
            self._check_limits()

    def _renew(self, now: float) -> None:
        """One call per queue for all its running tasks: cancel flags every second, and the
        leases extended when the oldest renewal is due (see WorkerOptions.renew_interval)."""
        for queue in self.queues:
            slots = [s for s in self._slots if s.task is not None and s.task.queue is queue]
            if not slots:
                continue
            interval = self.options.renew_interval(queue.visibility_timeout)
            extend = any(now - s.task.renewed >= interval for s in slots if s.task)
            states = queue.renew([s.task.message for s in slots if s.task], extend)
            for slot, state in zip(slots, states, strict=True):
                task = slot.task
                assert task is not None
                if extend:
                    task.renewed = now
                if not state.held:
                    self._log(task.message).warning("lease lost: another worker may run it")
                if state.cancel_requested:
                    slot.cancel_flag.value = 1

    def _time_limit(self, slot: Slot) -> None:
        task = slot.task
        assert task is not None
        step = task.current_step()
        slot.kill()
        error = {
            "type": "TimeLimitExceeded",
            "message": f"step {step!r} ran past its hard time limit and was killed",
            "traceback": None,
        }
        self._failed(slot, "timeout", error, step)

    def _idle_wait(self) -> float:
        return min(0.5, self.options.heartbeat_interval)

    def _heartbeat(self) -> None:
        info = {
            "id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
            "queues": [queue.queue_name for queue in self.queues],
            "concurrency": self.concurrency, "processed": self.processed, "failed": self.failed,
            "started_at": self._started, "last_seen": time.time(),
            "state": "draining" if self.stop_reason else "running",
            "current": [
                {"task_id": s.task.message.task_id, "queue": s.task.message.queue,
                 "type": s.task.message.type, "step": s.task.current_step()}
                for s in self._slots if s.task is not None
            ],
        }  # fmt: skip
        try:
            asked = self.queues[0].register_worker(
                self.id, info, ttl=self.options.heartbeat_interval * 3
            )
        except ConveyorError as exc:
            logger.warning("heartbeat failed: {}", exc)
            return
        if asked and self.stop_reason is None:
            logger.info("worker {}: stop requested through the backend", self.id)
            self.stop("stop requested")

    def _limit_reached(self) -> str | None:
        options = self.options
        if options.max_jobs is not None and self.processed >= options.max_jobs:
            return f"max_jobs ({options.max_jobs}) reached"
        if options.max_time is not None and time.time() - self._started >= options.max_time:
            return f"max_time ({options.max_time:g}s) reached"
        if options.memory_mb is not None:
            used = resident_mb([s.process.pid for s in self._slots if s.process.pid])
            if used is not None and used >= options.memory_mb:
                return f"memory {used:.0f} MB >= {options.memory_mb} MB"
        return None

    def _check_limits(self) -> None:
        if self.stop_reason is None:
            reason = self._limit_reached()
            if reason is not None:
                logger.info("worker {}: {}; recycling", self.id, reason)
                self.stop(reason)

    # -- signals and the end ---------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Only flags: loguru's lock is not re-entrant, so logging here could deadlock a loop
        that was logging when the signal came. The loop logs (``_log_signals``)."""
        self._signals.append(signum)
        self.stop(signal.Signals(signum).name)

    def _log_signals(self) -> None:
        while self._signals:
            name = signal.Signals(self._signals.pop(0)).name
            self._signals_logged += 1
            if self._signals_logged == 1:
                logger.info(
                    "{}: stop taking work; waiting up to {:g}s for running tasks (again to "
                    "skip)", name, self.max_shutdown_wait,
                )  # fmt: skip
            else:
                logger.warning("{} again: not waiting any longer", name)

    def _finish(self) -> None:
        for slot in self._slots:
            slot.stop(timeout=2)
        try:
            self.queues[0].unregister_worker(self.id)
        except ConveyorError as exc:
            logger.warning("could not unregister: {}", exc)
        logger.info(
            "worker {} stopped ({}): processed={} failed={}",
            self.id, self.stop_reason or "error", self.processed, self.failed,
        )  # fmt: skip

    def _log(self, message: Message) -> Logger:
        return logger.bind(
            task_id=message.task_id, queue=message.queue, type=message.type,
            attempt=message.attempts, worker=self.id,
        )  # fmt: skip


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise OSError(f"child sent an unreadable reply: {exc}") from None
    if not isinstance(value, dict):
        raise OSError("child sent a non-object reply")
    return value


def _refused(exc: TaskValidationError | TaskTypeError) -> dict[str, Any]:
    """A result the queue refused, as the task's error."""
    message = f"cannot store the result: {exc}"
    return {"type": "InvalidResult", "message": message, "traceback": None}
