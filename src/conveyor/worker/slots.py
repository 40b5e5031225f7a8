"""A slot: one child process and the task it runs, as the worker's main loop sees them."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from ..descriptors import readable_now
from ..manager import QueueManager
from ..models import Message
from ..pipeline import Pipeline, PipelineError, PipelineService
from .child import CANCEL_ANY, child_main
from .direct import ChildSettler
from .flags import Flag, shared_flag


@dataclass
class RunningTask:
    """A task handed to a child: what the main loop needs to renew, time and settle it."""

    message: Message
    queue: QueueManager
    pipeline: Pipeline | None
    steps: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    step_started: float = field(default_factory=time.monotonic)
    renewed: float = field(default_factory=time.monotonic)
    lease_lost: bool = False  # said once: a renewal found the lease gone
    pauses: bool = False  # the child waits for go/yield after each step (preemptible)
    run: int = 0  # the run's number in its slot: what the cancel flag names

    def cancel_asked(self, flag: int) -> bool:
        """The slot's cancel flag names this run (or any)."""
        return flag != 0 and flag in (CANCEL_ANY, self.run)

    def current_step(self) -> str | None:
        """The first step without a stored result: the one the child is running now."""
        if self.pipeline is None:
            return None
        for step in self.pipeline.steps:
            if step.name not in self.steps:
                return step.name
        return None

    def deadline(self) -> float | None:
        """Monotonic time the run must end by: the task's or the current step's hard limit."""
        limits: list[float] = []
        whole = self.message.process_timeout
        if whole is None and self.pipeline is not None:
            whole = self.pipeline.timeout
        if whole is not None:
            limits.append(self.started + whole)
        name = self.current_step()
        if name is not None and self.pipeline is not None:
            step_limit = self.pipeline.step_named(name).timeout
            if step_limit is not None:
                limits.append(self.step_started + step_limit)
        return min(limits) if limits else None


class Slot:
    """One child process. Replaced whenever it dies or is killed for a time limit."""

    def __init__(self, index: int, context: BaseContext, service: PipelineService,
                 shutdown_flag: Flag,
                 settler: ChildSettler | None = None) -> None:  # fmt: skip
        self.index = index
        self._context = context
        self._service = service
        self._shutdown_flag = shutdown_flag
        #: The number of the run to cancel (see ``child``); 0: none.
        self.cancel_flag = shared_flag(context)
        #: The run whose success the child is settling itself (see ``direct``): its steps
        #: are over, so its time limit no longer applies, and its lease may end any moment.
        self.settling = shared_flag(context)
        self._settler = settler
        self.runs = 0  # runs started in this slot, by the worker or by the child itself
        #: The child claimed a task itself since the worker last handed it one: on
        #: RabbitMQ its channel holds that delivery until the child is told (``let_go``).
        self.child_claimed = False
        self.task: RunningTask | None = None
        self.conn: Connection
        #: Notices of runs the child went on from by itself (see ``direct``), or None.
        self.notices: Connection | None = None
        self.process: BaseProcess
        self.spawn()

    def spawn(self) -> None:
        self.child_claimed = False
        parent_end, child_end = multiprocessing.Pipe(duplex=True)
        settler, writer = self._settler, None
        if settler is not None:
            self.notices, writer = multiprocessing.Pipe(duplex=False)
            settler = settler.for_child(self.settling, writer)
        self.process = self._context.Process(  # type: ignore[attr-defined]
            target=child_main,
            args=(child_end, self._service, self.cancel_flag, self._shutdown_flag, settler),
            name=f"conveyor-child-{self.index}",
            daemon=True,
        )
        self.process.start()
        child_end.close()
        if writer is not None:
            writer.close()
        self.conn = parent_end

    def read_notices(self) -> list[dict[str, Any]]:
        """The notices waiting on the notice pipe, in order (none once the child is gone)."""
        found: list[dict[str, Any]] = []
        while self.notices is not None and readable_now(self.notices):
            try:
                notice = json.loads(self.notices.recv_bytes())
            except (EOFError, OSError, ValueError):
                break  # the child died (mid-notice, perhaps): its death says the rest
            if isinstance(notice, dict):
                found.append(notice)
        return found

    def _close_notices(self) -> None:
        if self.notices is not None:
            self.notices.close()
            self.notices = None

    @property
    def busy(self) -> bool:
        return self.task is not None

    def settling_itself(self, task: RunningTask) -> bool:
        """The child finished ``task`` and is settling it itself, or has (its notice is on
        the way, perhaps behind others: run numbers only grow within a slot)."""
        return task.run != 0 and self.settling.value >= task.run

    def start(
        self,
        message: Message,
        queue: QueueManager,
        service: PipelineService,
        *,
        preempting: bool = False,
    ) -> None:
        """Hand a task to the child; it starts at the first step without a stored result.

        ``preempting``: the worker preempts, so a preemptible pipeline pauses between steps.
        """
        try:
            pipeline: Pipeline | None = service.resolve(message.type)
        except PipelineError:
            pipeline = None  # the child reports the unknown pipeline as the task's failure
        self.cancel_flag.value = 0
        self.child_claimed = False  # the run request lets go of them (see ``let_go``)
        pauses = preempting and pipeline is not None and pipeline.preemptible
        self.runs += 1
        self.task = RunningTask(message, queue, pipeline, dict(message.steps), pauses=pauses,
                                run=self.runs)  # fmt: skip
        request = {
            "op": "run", "task_id": message.task_id, "data": message.data,
            "attempt": message.attempts, "queue": message.queue, "type": message.type,
            "steps": message.steps, "pause": pauses,
            "limits": {"max_bytes": queue.max_payload_bytes, "max_depth": queue.max_json_depth},
            "token": message.token, "run": self.runs,
        }  # fmt: skip
        self.conn.send_bytes(json.dumps(request).encode())

    def continued(self, message: Message, queue: QueueManager, service: PipelineService,
                  run: int, *, started: float, leased: float) -> None:  # fmt: skip
        """The child settled its task and went on to ``message`` by itself (``direct``):
        claimed at ``leased``, started at ``started`` (monotonic)."""
        try:
            pipeline: Pipeline | None = service.resolve(message.type)
        except PipelineError:
            pipeline = None
        self.runs, self.child_claimed = run, True
        self.task = RunningTask(message, queue, pipeline, dict(message.steps), started=started,
                                step_started=started, renewed=leased, run=run)  # fmt: skip

    def let_go(self) -> None:
        """Tell an idle child that what it claimed itself is settled (the worker stored
        the outcome), so it lets go of the delivery its channel still holds (RabbitMQ;
        elsewhere the child has nothing to let go). No reply."""
        if self.child_claimed and not self.busy:
            self.child_claimed = False
            with contextlib.suppress(OSError):  # the child is gone: its deliveries went too
                self.conn.send_bytes(b'{"op": "release"}')

    def resume(self, *, yield_now: bool = False) -> None:
        """Answer a paused child: go on to the next step, or yield (return, no reply)."""
        self.conn.send_bytes(b'{"op": "yield"}' if yield_now else b'{"op": "go"}')

    def kill(self) -> None:
        """SIGKILL the child (a hung or over-limit step) and start a fresh one."""
        self.process.kill()
        self.process.join(5)
        self.conn.close()
        self._close_notices()
        self.spawn()

    def stop(self, timeout: float) -> None:
        """Ask an idle child to exit; kill it if it does not."""
        with contextlib.suppress(OSError):
            self.conn.send_bytes(b'{"op": "stop"}')
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.conn.close()
        self._close_notices()
