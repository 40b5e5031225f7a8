"""``TaskWorker``: the daemon loop that takes tasks, runs them in child processes, settles them.

One thread does everything — reserve, dispatch, collect results, renew leases, heartbeat —
so children can be forked safely and signal handlers only set flags (the loop acts on
them). Steps run in ``concurrency`` long-lived child processes: a crash, a leak or a hang
costs one child, which is replaced; the worker and its leases carry on.

Shutdown is an ordered sequence, one log line per step: stop taking work (at once), wait
for running tasks up to ``max_shutdown_wait`` while leases keep being renewed, hand back
(or fail, by ``shutdown_mode``) what is still running, stop the children, send the last
outcomes, unregister. A second signal skips the wait. Without the backend, the end is the
same, bounded by its timeouts: outcomes that cannot be sent are logged with their task ids
(the tasks come back when their leases run out).

The backend may stop answering at any time (a restart, a failover, a cut connection): the
worker rides it out instead of exiting. Outcomes go through an outbox (``outbox``) that is
sent at each turn, or when the backend answers again; ``outage`` keeps the backend's
state, its log lines and the reconnect backoff. While it is down, running children go on,
nothing new starts, and leases, sweeps and heartbeats pause (see ``_loop``).

Where the backend allows it, a child that finished a task acks it and claims the next one
itself, and tells the loop afterwards (``direct``): the loop keeps leases, limits, hooks
and logs, but no longer stands between one task and the next.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    from loguru import Logger

from .. import outcomes as build
from ..descriptors import readable_now
from ..descriptors import ready as descriptors_ready
from ..errors import (
    BrokerUnavailableError,
    ConfigError,
    ConveyorError,
    TaskTypeError,
    TaskValidationError,
)
from ..lifecycle import Op
from ..manager import QueueManager
from ..models import Message, TaskStatus
from ..pipeline import PipelineError, PipelineService
from ..validation import check_name
from .backoff import Backoff
from .direct import ChildSettler, message_from_fields
from .flags import shared_flag
from .heap import freeze_startup_heap, thaw_heap
from .heartbeat import worker_info
from .hooks import HookRunner, hook_name
from .leases import renew_running
from .options import WorkerOptions
from .outage import OutageWatch
from .outbox import Entry, Outbox
from .preemption import yield_floor
from .reserve import claim_floor
from .signals import StopSignals
from .slots import RunningTask, Slot
from .tasklog import info_enabled
from .threadpool import check_thread_pool, make_slots
from .upkeep import Upkeep, can_share
from .usage import recycling_reason
from .verdicts import Verdict, after_error, after_shutdown

_CANCEL_POLL = 1.0  # seconds between checks of running tasks' cancel flags (one call a queue)
_SWEEP_INTERVAL = 5.0  # seconds between maintenance sweeps (timeouts, lost leases, retention)
_BUSY_POLL = 0.05  # longest wait for results while a slot is free and the queue is empty
#: How long past a hard limit a child settling its finished run is left to finish that
#: call (longer than a Redis call can take: socket timeout, WAIT, a Sentinel failover).
_SETTLE_GRACE = 60.0
#: While children keep handing off by themselves, the loop reads their notices this often
#: instead of waking for each (see ``direct``).
NOTICE_TICK = 0.02


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
        self.preempted = 0  # tasks this worker yielded to more urgent ones
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
        self._upkeep: Upkeep | None = None  # sweeps and heartbeats off the loop (Redis)
        self._signals = StopSignals(self.stop, max_shutdown_wait)
        fork = multiprocessing.get_context("fork")
        self._shutdown_flag = shared_flag(fork)
        # Whether a child may settle and claim by itself right now (see ``direct``): set
        # each turn, cleared by ``stop``.
        self._hand_off = shared_flag(fork)
        self._settler: ChildSettler | None = None
        self._notices_flowing = False  # the last turn read notices: read them on a tick
        self.outbox = Outbox(self._log, self._after_outcome)
        self.hooks = HookRunner(self.options.hook_timeout)
        self.backend = OutageWatch(
            self.queues[0].url,
            Backoff(self.options.reconnect_backoff, self.options.reconnect_max_backoff),
        )

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
        if self.options.pool == "thread":
            check_thread_pool(self.options, self.service)
        interrupts = [queue.interrupt_fd for queue in self.queues]
        self._signals.install()
        try:  # the handlers and their pipe go back whatever happens from here
            for queue in self.queues:  # a blocking claim (no doorbell) ends on a signal too
                queue.interrupt_fd = self._signals.fd
            self._begin()
            try:
                self._loop()
            finally:
                self._finish()
        finally:
            for queue, fd in zip(self.queues, interrupts, strict=True):
                queue.interrupt_fd = fd  # before the pipe closes: its number may be reused
            self._signals.restore()
            thaw_heap()

    def _begin(self) -> None:
        """Fork the children (after freezing the start-up heap) and start the upkeep."""
        freeze_startup_heap()  # before forking: children share the frozen heap
        context = multiprocessing.get_context("fork")
        if self._children_may_settle():
            max_time = self.options.max_time
            self._settler = ChildSettler(
                self.queues[0], self._hand_off, self._shutdown_flag,
                None if max_time is None else self._started + max_time,
            )  # fmt: skip
        self._slots = make_slots(
            self.options.pool,
            self.concurrency,
            context,
            self.service,
            self._shutdown_flag,
            settler=self._settler,
        )
        names = ",".join(queue.queue_name for queue in self.queues)
        logger.info(
            "worker {} started: queues={} concurrency={} pool={} backend={} pid={}",
            self.id, names, self.concurrency, self.options.pool, self.queues[0].url, os.getpid(),
        )  # fmt: skip
        if can_share(self.queues):
            self._upkeep = Upkeep(
                self.queues, self._heartbeat, lambda: self.stop_reason is None,
                heartbeat_interval=self.options.heartbeat_interval, sweep_interval=_SWEEP_INTERVAL,
            )  # fmt: skip
            self._upkeep.start()

    def _children_may_settle(self) -> bool:
        """The plain case, where a child's own ack + claim is the very call the loop would
        make (see ``direct``): a process pool on one queue whose backend works from a
        forked child, with no reserved slots, preemption or job count to keep exact."""
        options = self.options
        return (
            options.pool == "process" and len(self.queues) == 1 and options.reserve is None
            and options.preemption is None and options.max_jobs is None
            and self.queues[0].settles_in_child
        )  # fmt: skip

    @property
    def refused(self) -> int:
        """Final outcomes the backend refused (their lease was lost): runs that may repeat."""
        return self.outbox.refused

    def stop(self, reason: str = "requested") -> None:
        """Begin a graceful shutdown (what SIGTERM does); safe to call from a signal handler."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self._drain_deadline = time.monotonic() + self.max_shutdown_wait
            self._hand_off.value = 0
            self._shutdown_flag.value = 1
        else:
            self._force = True
        self._signals.ring()  # the loop's wait ends now, whichever thread asked

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        """Turn until done. A backend call that finds the backend unreachable ends its turn
        and starts (or prolongs) an outage; every turn may end at any backend call, because
        nothing is decided in memory only: outcomes wait in the outbox until sent."""
        while True:
            try:
                if self._turn():
                    return
            except BrokerUnavailableError as exc:
                self.backend.lost(exc)

    def _turn(self) -> bool:
        """One pass: upkeep; wait for replies or take work; send what the runs reported
        (with claims for the slots that became free). True when the worker is done."""
        self._signals.log()
        if self._settler is not None:
            self._hand_off.value = self.backend.up and self.stop_reason is None
        self._maintain()
        busy = [slot for slot in self._slots if slot.busy]
        if self.stop_reason is not None:
            self._withdraw_doorbells()
            if not busy:
                return True
            if self._force or time.monotonic() >= self._drain_deadline:
                self._interrupt(busy)
                return True
            self._collect(busy, timeout=0.2)
        elif not self.backend.up:  # no new work: only replies, until the next try
            self._withdraw_doorbells()  # what a doorbell took goes back, for other workers
            self._collect(busy, timeout=min(0.2, self.backend.until_next_try()))
        else:
            self._work(busy)
        self._send()
        return False

    def _work(self, busy: list[Slot]) -> None:
        """Take a task for a free slot, or wait for replies when every slot is busy."""
        free = next((slot for slot in self._slots if not slot.busy), None)
        if free is None:
            self._withdraw_doorbells()
            self._collect(busy, timeout=self._idle_wait())
            return
        # An idle worker with a doorbell on every queue waits on them, not in a blocking
        # claim: a signal then ends the wait at once, and a push to any queue wakes it.
        rings = not busy and all(queue.has_doorbell for queue in self.queues)
        found = self._reserve(0.0 if busy or rings else self._idle_block())
        if found is not None:
            self._dispatch(free, *found)
        elif busy or rings:
            bells, wait = self._doorbells(self._idle_wait() if busy else self._idle_block())
            self._collect(busy, timeout=wait, bells=bells)
        else:  # a signal may have ended the blocking claim: read its byte, or the next
            self._signals.heard()  # claim would end at once too (see ``interrupt_fd``)

    def _doorbells(self, longest: float) -> tuple[dict[int, QueueManager] | None, float]:
        """Each queue's doorbell, so that a push ends the wait, and how long to wait: until
        the next task is due, or ``longest``. Without a doorbell on every queue: none, and
        a short wait (the caller claims again after it)."""
        bells: dict[int, QueueManager] = {}
        wait = longest
        for queue in self.queues:
            hint = queue.wait_hint
            seconds = wait if hint is None else max(0.001, min(wait, hint))
            fd = queue.doorbell(seconds)
            if fd is None:
                return None, _BUSY_POLL
            bells[fd] = queue
            wait = min(wait, seconds)
        return bells, wait

    def _reserve(self, block: float) -> tuple[Message, QueueManager] | None:
        """The most urgent task across queues; blocks up to ``block`` on the first queue.
        A claim for a reserved slot asks for its minimum priority (see ``reserve``)."""
        floor = claim_floor(self.options.reserve, self.concurrency, self._running_priorities())
        for queue in self.queues:
            message = queue.reserve(timeout=0, min_priority=floor)
            if message is not None:
                return message, queue
        if block <= 0:
            return None
        slice_ = block if len(self.queues) == 1 else min(block, 0.1)
        message = self.queues[0].reserve(timeout=slice_, min_priority=floor)
        return None if message is None else (message, self.queues[0])

    def _dispatch(self, slot: Slot, message: Message, queue: QueueManager) -> None:
        if self.stop_reason is not None:  # the signal came while we were blocked: give it back
            self.outbox.put(queue, message, build.nack(message, count_attempt=False))
            self._log(message).info("handed back at once: shutting down")
            return
        slot.start(message, queue, self.service, preempting=self.options.preemption is not None)
        if info_enabled():
            self._log(message).info("started")

    def _withdraw_doorbells(self) -> None:
        for queue in self.queues:
            queue.withdraw_doorbell()

    def _collect(
        self, busy: list[Slot], timeout: float, bells: dict[int, QueueManager] | None = None
    ) -> None:
        """Wait for replies from busy children (or their death), and with ``bells`` for a
        push too, up to ``timeout`` or a signal; act on the replies."""
        signals = self._signals.fd
        waitables: list[Any] = [slot.conn for slot in busy] + [
            slot.process.sentinel for slot in busy
        ]
        if signals is not None:
            waitables.append(signals)
        if bells:
            waitables += bells
        if not waitables:
            time.sleep(timeout)
            return
        if self._notices_flowing:
            timeout = min(timeout, NOTICE_TICK)
        else:
            waitables += [slot.notices for slot in busy if slot.notices is not None]
        ready = descriptors_ready(waitables, timeout)
        if signals in ready:
            self._signals.heard()
        for fd, queue in (bells or {}).items():
            if fd in ready:
                queue.heard_doorbell()
        self._notices_flowing = self._read_notices(busy)
        for slot in busy:
            if slot.conn in ready:
                self._read_replies(slot)
            elif slot.process.sentinel in ready and slot.busy:
                self._child_died(slot)

    def _read_notices(self, slots: list[Slot]) -> bool:
        """Act on the notices of runs the children went on from by themselves: before
        anything else about a slot, so it concerns the task its child really runs. True
        when there were any."""
        found = False
        for slot in slots:
            for notice in slot.read_notices():
                found = True
                if slot.task is not None:
                    self._settled_by_child(slot, notice)
        return found

    def _read_replies(self, slot: Slot) -> None:
        """Act on every reply waiting in the pipe (at least one: it was readable)."""
        first = True
        while slot.busy and (first or readable_now(slot.conn)):
            first = False
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
                outcome = build.progress(task.message, float(fraction), note)  # type: ignore[arg-type]
            except (ValueError, TypeError) as exc:  # advisory: never worth a crash
                self._log(task.message).warning("progress not recorded: {}", exc)
                return
            self.outbox.put(task.queue, task.message, outcome)
        elif op == "step":
            task.steps[str(reply["name"])] = reply.get("result")
            task.step_started = time.monotonic()
            queue = task.queue
            try:
                outcome = build.checkpoint(
                    task.message, task.steps, queue.max_payload_bytes, queue.max_json_depth
                )
            except (TaskValidationError, TaskTypeError) as exc:
                # The results so far cannot be stored (together over the size limit): the
                # child is on the next step already; stop it and fail the task, recorded.
                slot.kill()
                self._failed(slot, "invalid_result", _refused(exc), str(reply["name"]))
                return
            self.outbox.put(queue, task.message, outcome)
            if info_enabled():
                self._log(task.message).info("step {} done", reply["name"])
            if task.pauses:
                self._at_step_boundary(slot)
        elif op == "done":
            self._succeeded(slot, reply.get("result"), tried=bool(reply.get("tried")))
        elif op == "settled":
            self._settled_by_child(slot, reply)
        elif op == "error":
            self._failed(slot, str(reply.get("reason", "error")), reply, reply.get("step"))

    # -- preemption -------------------------------------------------------------------------

    def _at_step_boundary(self, slot: Slot) -> None:
        """A preemptible run paused after a step: yield it to an urgent task, or let it go
        on. The child always gets its answer, whatever the backend does meanwhile."""
        yielded = False
        try:
            yielded = self._maybe_preempt(slot)
        finally:
            if not yielded:
                slot.resume()

    def _maybe_preempt(self, slot: Slot) -> bool:
        """Yield ``slot``'s task if the policy says so and the store agrees (see
        ``preemption``); the urgent task starts in the same slot. True when it yielded."""
        policy, task = self.options.preemption, slot.task
        if policy is None or task is None or self.stop_reason is not None:
            return False
        if not self.backend.up or not all(other.busy for other in self._slots):
            return False  # a free slot takes the urgent task without anyone yielding
        others = [
            other.task.message.priority
            for other in self._slots
            if other is not slot and other.task is not None and other.task.pauses
        ]
        queue = task.queue
        floor = yield_floor(policy, task.message.priority, others, queue.head(), time.time())
        if floor is None:
            return False
        yielded, urgent = queue.preempt(
            task.message, task.steps, min_priority=floor, max_preemptions=policy.max_preemptions
        )
        if not yielded:
            return False
        slot.resume(yield_now=True)
        slot.task = None
        self.outbox.drop(queue, task.message)  # the yield stored its checkpoint
        self.preempted += 1
        by = urgent.task_id if urgent is not None else "a task that proved unreadable"
        self._log(task.message).info("preempted by {} after step {}", by, _last_step(task))
        if urgent is not None:
            self._dispatch(slot, urgent, queue)
        return True

    def _running_priorities(self) -> list[int]:
        return [slot.task.message.priority for slot in self._slots if slot.task is not None]

    # -- sending outcomes ------------------------------------------------------------------

    def _send(self) -> None:
        """Send the outbox: one settle per queue, with claims for free slots riding along.

        While the backend is down, this is also where it is asked again (a ping, at the
        backoff's pace): once it answers, the waiting outcomes go out, and leases and the
        heartbeat are renewed at once.
        """
        if self.backend.up and not self.outbox:
            self._let_children_go()
            return
        if not self.backend.up:
            if not self.backend.may_try():
                return
            self.queues[0].ping()
            self.backend.answered(len(self.outbox))
            self._next_renewal = self._next_heartbeat = 0.0
        for queue in self.outbox.queues(self.queues):
            count, floor = self._claims(queue)
            for message in self.outbox.send(queue, count, floor):
                self._dispatch(next(s for s in self._slots if not s.busy), message, queue)
        self._let_children_go()

    def _let_children_go(self) -> None:
        """Every outcome is stored: idle children let go of what they claimed themselves
        (see ``direct``), instead of holding it until their next task."""
        if self._settler is not None:
            for slot in self._slots:
                slot.let_go()

    def _claims(self, queue: QueueManager) -> tuple[int, int | None]:
        """How many tasks to claim with the outcomes, and their minimum priority: one per
        free slot, with one queue only (several are served in strict order by
        ``_reserve``) and while taking work. With reserved slots, ordinary tasks fill only
        the ordinary room; a reserved slot's claim asks for the reserved priority."""
        if len(self.queues) > 1 or self.stop_reason is not None or self._limit_reached():
            return 0, None
        free = sum(1 for slot in self._slots if not slot.busy)
        if self.options.max_jobs is not None:
            busy = len(self._slots) - free
            free = min(free, max(0, self.options.max_jobs - self.processed - busy))
        reserve = self.options.reserve
        if reserve is None or free == 0:
            return free, None
        room = reserve.ordinary_room(self.concurrency, self._running_priorities())
        return (min(free, room), None) if room > 0 else (free, reserve.priority)

    def _after_outcome(self, entry: Entry, op: Op, status: str) -> None:
        """Run the pipeline's hook for an outcome the backend accepted (at most once)."""
        name = hook_name(op, status)
        if name is None:
            return
        try:
            function = getattr(self.service.resolve(entry.message.type), name)
        except PipelineError:
            return
        if function is None:
            return
        try:
            record = entry.queue.get_task(entry.message.task_id)
        except ConveyorError as exc:
            self._log(entry.message).warning("{} not run: cannot read the record: {}", name, exc)
            return
        if record is not None:
            self.hooks.fire(name, function, record)

    def _send_last(self) -> None:
        """At the end: send what is left, once (not waiting for a backend that is down
        and was tried just now); log, with the task ids, what cannot be sent."""
        if not self.outbox:
            return
        if self.backend.up or self.backend.may_try():
            try:
                if not self.backend.up:
                    self.queues[0].ping()
                for queue in self.outbox.queues(self.queues):
                    self.outbox.send(queue)
                return
            except BrokerUnavailableError as exc:
                self.backend.lost(exc)
            except ConveyorError as exc:
                logger.warning("could not send the last outcomes: {}", exc)
        self.outbox.log_unsent()

    # -- settling --------------------------------------------------------------------------

    def _succeeded(self, slot: Slot, result: Any, *, tried: bool = False) -> None:
        task = slot.task
        assert task is not None
        queue = task.queue
        try:  # the result is checked before anything is kept to send
            outcome = build.ack(task.message, result, queue.max_payload_bytes, queue.max_json_depth)
        except (TaskValidationError, TaskTypeError) as exc:
            self._failed(slot, "invalid_result", _refused(exc), None)
            return
        slot.task = None
        self.processed += 1
        self.outbox.put(queue, task.message, outcome, time.monotonic() - task.started,
                        tried=tried)  # fmt: skip
        self._check_limits()

    def _settled_by_child(self, slot: Slot, notice: dict[str, Any]) -> None:
        """The child acked its task and may run the next one already (see ``direct``)."""
        task = slot.task
        assert task is not None
        slot.task = None
        self.processed += 1
        ended = float(notice.get("at") or time.monotonic())  # read up to a tick later
        entry = Entry(task.queue, task.message, ran=max(0.0, ended - task.started))
        accepted = bool(notice.get("accepted"))
        task.queue.settled_by_child(task.message, accepted)
        self.outbox.report(entry, Op.ACK, accepted, by_child=True)
        if accepted:
            self._after_outcome(entry, Op.ACK, TaskStatus.SUCCESS)
        following = notice.get("next")
        if isinstance(following, dict):
            message = message_from_fields(following)
            leased = float(notice.get("leased") or ended)
            slot.continued(message, task.queue, self.service, int(notice["run"]), started=ended,
                           leased=leased)  # fmt: skip
            if info_enabled():
                self._log(message).info("started")
        self._check_limits()

    def _failed(self, slot: Slot, reason: str, error: dict[str, Any], step: Any) -> None:
        task = slot.task
        assert task is not None
        slot.task = None
        verdict = after_error(
            task, reason, error, step, cancel_asked=task.cancel_asked(slot.cancel_flag.value),
            stopping=self.stop_reason is not None, options=self.options,
        )  # fmt: skip
        self._settle(task.queue, task.message, verdict)
        self.processed += 1
        self._check_limits()

    def _settle(self, queue: QueueManager, message: Message, verdict: Verdict) -> None:
        self.outbox.put(queue, message, verdict.outcome)
        self.failed += verdict.failed
        self._log(message).log(verdict.level, verdict.text)

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
            slot.process.kill()
            slot.process.join(5)
            self._read_notices([slot])  # what it settled and went on to before it died
            task = slot.task
            if task is None:
                continue
            slot.task = None
            self._settle(task.queue, task.message, after_shutdown(task.message, self.options))

    # -- upkeep ----------------------------------------------------------------------------

    def _maintain(self) -> None:
        """Enforce time limits; with the backend up, also renew leases and pass on cancels,
        sweep, heartbeat and check recycling (all of which wait out an outage)."""
        if self._settler is not None and self._read_notices([s for s in self._slots if s.busy]):
            self._notices_flowing = True
        now = time.monotonic()
        for slot in self._slots:
            task = slot.task
            if task is None:
                if not slot.process.is_alive():
                    slot.kill()
                continue
            if self._past_limit(slot, task, now):
                self._time_limit(slot)
        self.hooks.check()
        if not self.backend.up:
            return
        if now >= self._next_renewal:
            self._next_renewal = now + self._renewal_period
            renew_running(self.queues, self._slots, self.options, now, self._log)
        if now >= self._next_sweep and self.stop_reason is None and self._upkeep is None:
            self._next_sweep = now + _SWEEP_INTERVAL
            for queue in self.queues:
                queue.sweep()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.options.heartbeat_interval
            if self._upkeep is None:
                self._heartbeat()
            self._check_limits()

    def _settling(self, slot: Slot, task: RunningTask, now: float) -> bool:
        """The run's steps are over and the child is settling it itself (``direct``): not
        a run past its limit, unless that call has outlasted any client timeout."""
        deadline = task.deadline()
        return (
            slot.settling_itself(task) and deadline is not None
            and now <= deadline + _SETTLE_GRACE
        )  # fmt: skip

    def _time_limit(self, slot: Slot) -> None:
        """Fail (or retry) the run, store that, then kill its child. The store comes first:
        on RabbitMQ a task the child claimed itself is held by the child's channel (see
        ``direct``), and the child's death puts the delivery back in the queue at once;
        there, while the store still said the task runs, the next claim would take it for
        a crashed holder's and run it again. The child is frozen meanwhile, so that it
        neither goes on with the step nor settles the run and claims a next task; what
        it did before that is read first (the limit may concern a run that is over).
        During an outage nothing can be stored first: the child is killed at once."""
        pid = slot.process.pid  # None: a thread of the worker, not a process
        frozen = pid is not None and self.backend.up and _send_signal(pid, signal.SIGSTOP)
        if frozen and pid is not None and not self._still_past_limit(slot):
            _send_signal(pid, signal.SIGCONT)
            return
        task = slot.task
        assert task is not None
        step = task.current_step()
        error = {
            "type": "TimeLimitExceeded",
            "message": f"step {step!r} ran past its hard time limit and was killed",
            "traceback": None,
        }
        self._failed(slot, "timeout", error, step)
        try:
            if frozen:
                self.outbox.send(task.queue)  # no claim: the slot's child is the old one yet
        except BrokerUnavailableError as exc:
            self.backend.lost(exc)
        finally:
            slot.kill()

    def _still_past_limit(self, slot: Slot) -> bool:
        """After freezing its child: is the slot's run still past its limit, and not being
        settled by the child itself? (Its notices may say it went on to another run.)"""
        if self._read_notices([slot]):
            self._notices_flowing = True
        task = slot.task
        return task is not None and self._past_limit(slot, task, time.monotonic())

    def _past_limit(self, slot: Slot, task: RunningTask, now: float) -> bool:
        """The run is past its hard time limit, and not being settled by the child."""
        deadline = task.deadline()
        return deadline is not None and now > deadline and not self._settling(slot, task, now)

    def _idle_wait(self) -> float:
        return min(0.5, self.options.heartbeat_interval)

    def _idle_block(self) -> float:
        """How long an idle worker waits for work: ``idle_block``, but not past its next
        heartbeat when the loop beats itself (no upkeep thread): the heartbeat is also where
        a stop request is heard, and a late one lets the worker's registration lapse."""
        if self._upkeep is not None:
            return self.options.idle_block
        until_beat = self._next_heartbeat - time.monotonic()
        return max(0.01, min(self.options.idle_block, until_beat))

    def _heartbeat(self) -> None:
        info = worker_info(
            self.id, [queue.queue_name for queue in self.queues], self._slots,
            processed=self.processed, failed=self.failed, started_at=self._started,
            draining=self.stop_reason is not None,
        )  # fmt: skip
        try:
            asked = self.queues[0].register_worker(
                self.id, info, ttl=self.options.heartbeat_interval * 3
            )
        except BrokerUnavailableError:
            raise  # an outage: the loop handles it
        except ConveyorError as exc:
            logger.warning("heartbeat failed: {}", exc)
            return
        if asked and self.stop_reason is None:
            logger.info("worker {}: stop requested through the backend", self.id)
            self.stop("stop requested")

    def _limit_reached(self) -> str | None:
        pids = [slot.process.pid for slot in self._slots if slot.process.pid]
        return recycling_reason(self.options, self.processed, self._started, pids)

    def _check_limits(self) -> None:
        if self.stop_reason is None:
            reason = self._limit_reached()
            if reason is not None:
                logger.info("worker {}: {}; recycling", self.id, reason)
                self.stop(reason)

    # -- the end ------------------------------------------------------------------------

    def _finish(self) -> None:
        self._hand_off.value = 0  # also after an unexpected error: no child claims now
        self._shutdown_flag.value = 1
        if self._upkeep is not None:
            self._upkeep.stop()
        with contextlib.suppress(ConveyorError):  # also after an unexpected error: what a
            self._withdraw_doorbells()  # doorbell took goes back before the manager closes
        # The outcomes before the children go: a child's exit gives back what its channel
        # holds (RabbitMQ, see ``direct``), and back in the queue before the store says the
        # task ended, it would be taken for a crashed holder's and run again.
        self._send_last()
        for slot in self._slots:
            slot.stop(timeout=2)
        self.hooks.wait(min(self.options.hook_timeout, 5.0))
        if self.backend.up:
            try:
                self.queues[0].unregister_worker(self.id)
            except ConveyorError as exc:
                logger.warning("could not unregister: {}", exc)
        logger.info(
            "worker {} stopped ({}): processed={} failed={} refused={}",
            self.id, self.stop_reason or "error", self.processed, self.failed, self.refused,
        )  # fmt: skip

    def _log(self, message: Message) -> Logger:
        return logger.bind(
            task_id=message.task_id, queue=message.queue, type=message.type,
            attempt=message.attempts, worker=self.id,
        )  # fmt: skip


def _send_signal(pid: int, signum: int) -> bool:
    """Signal a child; False when it is gone already."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


def _last_step(task: RunningTask) -> str:
    return next(reversed(task.steps), "?") if task.steps else "?"


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
