"""The child settles its own success and claims the next task ("direct hand-off").

Without it, every task crosses three processes in turn: the child replies ``done``, the
worker sends the ack and the claim to the backend, waits, and hands the next task to the
child. On two cores shared with the broker, that sequence (not any one part of it) bounds
how many tasks a slot runs per second. With it, a child that finished a task with a
result acks it and claims the next one itself, in the same single atomic call the worker
would have made (``QueueManager.settle`` with ``claim=1``), tells the worker what it did,
and starts the next task at once. The worker keeps everything else: leases and cancel
flags, time limits, hooks, logs, counts, outages, shutdown.

Nothing about a task changes: the same transition, the same fencing token (a late ack is
refused, as the worker's would be), the same strict priority order (the claim takes the
most urgent ready task at the moment this slot frees, as the worker's claim does).

The child takes this path only when the worker allows it at that moment (a shared flag)
and only for the plain case; anything else is the usual ``done`` reply:

* the backend can be used from a forked child (``QueueStore.settles_in_child``: Redis,
  and RabbitMQ over a Redis task store);
* a process pool, one queue, no reserved slots, no preemption, no ``max_jobs`` (a claim
  the worker did not count could overshoot it): decided once, at start;
* the worker is taking work, and the backend answers (an outage is the worker's to ride
  out, with its outbox): the shared flag, updated every turn and cleared on stop;
* the run sent nothing else to the worker (no progress, no step checkpoints): an outcome
  waiting in the worker's outbox must reach the backend before the ack.

A claim made by a child that dies before it told the worker is held by a lease that
nobody renews: the task comes back when it runs out, as for any crashed worker.

On RabbitMQ the lease is the unacked delivery, and the child's claim is a delivery on a
link the child opened itself (after the fork; the worker's I/O thread did not come
along). So a task the child took is held by the child's channel: the child acks it when
it settles it itself; the worker acks the deliveries it claimed when the child's notice
says the child settled them (``settled_by_child``). A task the child took that ends on
the worker's path (a failure, a retry) is settled in the store by the worker, which also
publishes its new ticket; its old delivery goes back to the queue (and is dropped there
as stale) when the worker hands the child its next task, or tells it to (``let_go``; the
worker does once that outcome is stored and the slot stays idle), not before: back in
the queue while the store still says it runs, it would be taken for a crashed holder's.
For the same reason the worker stores a time limit's outcome before it kills the child
(frozen meanwhile), whose death gives its deliveries back at once, and stores its last
outcomes before its children exit. A child that crashes, or that the worker kills at the
end of a shutdown's grace period or for a time limit during an outage, gives them back
before the worker stored anything: another worker can take such a task within those
milliseconds, and it then counts as a lost delivery (the worker's outcome is refused by
fencing), as after any crash. The child's heartbeats flow from its own I/O thread: a
step that holds the GIL for two heartbeat intervals loses the child's connection, and
with it the lease.

The notice of a run that went on to a next task is sent on a pipe of its own, which the
worker does not wait on while such notices keep coming: it reads them at each turn, at
least every ``NOTICE_TICK``, and always before it looks at a slot's time limits, lease,
reply or death (so each of those concerns the task the child really runs). Waking the
worker for every task cost as much as the hand-off saved, on two cores shared with the
broker. Everything that needs the worker now (a failure, a run with nothing claimed after
it) goes on the slot's usual pipe, which wakes it at once.
"""

from __future__ import annotations

import contextlib
import json
import time
from multiprocessing.connection import Connection
from typing import Any

from .. import outcomes as build
from ..errors import TaskTypeError, TaskValidationError
from ..manager import QueueManager
from ..models import Message
from .flags import Flag


class ChildSettler:
    """The child's side: settle a ``done`` reply and claim the next task, if allowed."""

    def __init__(self, queue: QueueManager, allowed: Flag, shutdown_flag: Flag,
                 not_after: float | None = None) -> None:  # fmt: skip
        self.queue = queue
        self.allowed = allowed
        self.shutdown_flag = shutdown_flag
        #: The worker's ``max_time`` end (epoch seconds): no claim of its own after it.
        self.not_after = not_after
        #: The slot's marker: the run this child is settling (set by ``for_child``).
        self.settling: Flag | None = None
        #: The child's end of its slot's notice pipe (set by ``for_child``).
        self.notices: Connection | None = None

    def for_child(self, settling: Flag, notices: Connection) -> ChildSettler:
        """This settler for one child process: it tells the worker through its slot's
        ``settling`` marker which run it is settling (the steps are over: no time limit
        applies any more), and sends notices on its own pipe."""
        mine = ChildSettler(self.queue, self.allowed, self.shutdown_flag, self.not_after)
        mine.settling, mine.notices = settling, notices
        return mine

    def tell(self, notice: dict[str, Any]) -> None:
        """Send a notice of a run that goes on to a next task on the notice pipe, which the
        worker reads at its own pace (see the module's doc)."""
        assert self.notices is not None
        self.notices.send_bytes(json.dumps(notice).encode())

    def let_go(self) -> None:
        """The worker hands this child a task, or says so (``release``): whatever the
        child claimed itself before has ended on the worker's path and is settled in the
        store; let go of its broker delivery."""
        with contextlib.suppress(Exception):  # a lost link dropped it already
            self.queue.release_held()

    def may_settle(self) -> bool:
        if not self.allowed.value or self.shutdown_flag.value:
            return False
        return self.not_after is None or time.time() < self.not_after

    def settle(
        self, request: dict[str, Any], reply: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Ack the finished run and claim the next task in one call. Returns the notice for
        the worker and the next run's request (None: nothing claimed). When the call
        fails, the notice is the ``done`` reply itself, marked ``tried`` (the ack may have
        been applied: a refusal of the worker's copy is then not a lost lease)."""
        queue = self.queue
        if self.settling is not None:  # left set: the worker reads it until our notice
            self.settling.value = int(request.get("run", 0))
        try:
            outcome = build.ack_lease(request["task_id"], request["token"], reply.get("result"),
                                      queue.max_payload_bytes, queue.max_json_depth)  # fmt: skip
        except (TaskValidationError, TaskTypeError):
            return reply, None  # the worker fails it as invalid_result, as always
        asked = time.monotonic()  # the next task's lease counts from about here
        try:
            settled, claimed = queue.settle([outcome], claim=1)
        except Exception:  # an outage, or anything unexpected: the worker's path takes it
            return {**reply, "tried": True}, None
        run = int(request.get("run", 0)) + 1
        following = claimed[0] if claimed else None
        notice = {
            "op": "settled", "accepted": settled[0].status is not None, "run": run,
            "next": None if following is None else message_fields(following),
            "at": time.monotonic(),  # the next run's start (the clock is system-wide)
            "leased": asked,
        }  # fmt: skip
        if following is None:
            return notice, None
        return notice, run_request(following, run, request.get("limits") or {})


def run_request(message: Message, run: int, limits: dict[str, Any]) -> dict[str, Any]:
    """The child protocol's ``run`` request for ``message`` (see ``child``)."""
    return {
        "op": "run", "task_id": message.task_id, "data": message.data,
        "attempt": message.attempts, "queue": message.queue, "type": message.type,
        "steps": message.steps, "pause": False, "limits": limits, "token": message.token,
        "run": run,
    }  # fmt: skip


def message_fields(message: Message) -> dict[str, Any]:
    """A claimed message as JSON for the worker (``message_from_fields`` reads it back),
    without its data: the child has it, the worker never reads it (notices stay small)."""
    return {
        "task_id": message.task_id, "data": None, "priority": message.priority,
        "queue": message.queue, "type": message.type, "attempts": message.attempts,
        "max_retries": message.max_retries, "retry_backoff": message.retry_backoff,
        "process_timeout": message.process_timeout, "created_at": message.created_at,
        "steps": message.steps, "token": message.token,
    }  # fmt: skip


def message_from_fields(fields: dict[str, Any]) -> Message:
    """The worker's copy of a message its child claimed (already checked by the child's
    claim: no second validation on the hot path)."""
    backoff = fields.get("retry_backoff")
    if isinstance(backoff, list):
        fields = {**fields, "retry_backoff": tuple(backoff)}
    return Message.model_construct(**fields, leased=True)
