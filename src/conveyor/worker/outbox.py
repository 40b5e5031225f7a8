"""The outbox: what running tasks reported, waiting to be sent to the backend.

Every outcome of a run (a progress note, a checkpoint, the final ack, nack, fail or
hand-back) is put here first, and the loop sends the outbox at its next turn: one settle
per queue, with the claims for the worker's free slots riding along, the same single round
trip per task as before. While the backend does not answer, outcomes simply stay here, and
they are sent when it answers again; the children never wait for the broker.

Bounded by construction: an entry is one held task (queue, task id, fencing token), and it
keeps at most the latest progress, the latest checkpoint (each holds every step finished so
far) and one final outcome. No task starts while the backend is down, so the outbox never
holds more than three outcomes per slot.

A late outcome may no longer count: the lease ran out during the outage and the task went
back to the queue (or to another worker). Fencing decides, as for any outcome: the backend
refuses an outcome whose token is not the current holder's, and the caller counts that as
a duplicate run, not as an error. A send that failed may have been applied before the reply
was lost; sending it again is safe for the same reason (the second copy is refused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..backends import Outcome
from ..errors import BrokerUnavailableError
from ..lifecycle import Op
from ..manager import QueueManager
from ..models import Message
from ..outcomes import FINAL_OPS
from .tasklog import info_enabled

if TYPE_CHECKING:
    from loguru import Logger


@dataclass(slots=True)
class Entry:
    """The outcomes of one held task that are not sent yet."""

    queue: QueueManager
    message: Message
    progress: Outcome | None = None
    checkpoint: Outcome | None = None
    final: Outcome | None = None
    ran: float = 0.0  # seconds the run took (for the success line)
    failed_sends: int = 0  # a refusal after one of these may be our own earlier copy

    def outcomes(self) -> list[Outcome]:
        """In the order they happened: progress and checkpoints before the end."""
        return [o for o in (self.progress, self.checkpoint, self.final) if o is not None]


class Outbox:
    """Outcomes waiting to be sent, per held task; ``log(message)`` is a task's logger."""

    def __init__(
        self,
        log: Callable[[Message], Logger],
        accepted: Callable[[Entry, Op, str], None] | None = None,
    ) -> None:
        self._entries: dict[tuple[str, str, str], Entry] = {}
        self._log = log
        #: Told of each final outcome the backend accepted, with the status it set (hooks).
        self._accepted = accepted
        #: Final outcomes fencing refused: each one is a run that may be duplicated.
        self.refused = 0

    def __len__(self) -> int:
        return sum(len(entry.outcomes()) for entry in self._entries.values())

    def __bool__(self) -> bool:
        return bool(self._entries)

    def put(
        self, queue: QueueManager, message: Message, outcome: Outcome, ran: float = 0,
        *, tried: bool = False,
    ) -> None:  # fmt: skip
        """Keep ``outcome`` until sent, replacing an earlier one of its kind. ``tried``: a
        child already tried to send it (a refusal may be that copy's doing)."""
        key = (queue.queue_name, message.task_id, message.token or "")
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = Entry(queue, message)
        if outcome.op in FINAL_OPS:
            entry.final, entry.ran = outcome, ran
            entry.failed_sends += tried
        elif outcome.op is Op.CHECKPOINT:
            entry.checkpoint = outcome
        else:
            entry.progress = outcome

    def queues(self, order: Sequence[QueueManager]) -> list[QueueManager]:
        """The queues with outcomes waiting, in ``order`` (the worker's, most urgent first)."""
        waiting = {id(entry.queue) for entry in self._entries.values()}
        return [queue for queue in order if id(queue) in waiting]

    def drop(self, queue: QueueManager, message: Message) -> None:
        """Forget what waits for a task that a preemption yields: the yield stores its
        checkpoint itself, and anything sent after it would be refused (not held)."""
        self._entries.pop((queue.queue_name, message.task_id, message.token or ""), None)

    def send(
        self, queue: QueueManager, claim: int = 0, min_priority: int | None = None
    ) -> list[Message]:
        """Send the queue's outcomes and claim up to ``claim`` tasks, in one round trip;
        log what became of each final outcome; return the claimed tasks.

        Raises ``BrokerUnavailableError`` with the outcomes still kept, to send again later.
        """
        keys = [key for key, entry in self._entries.items() if entry.queue is queue]
        entries = [self._entries[key] for key in keys]
        outcomes = [outcome for entry in entries for outcome in entry.outcomes()]
        try:
            settled, claimed = queue.settle(outcomes, claim=claim, min_priority=min_priority)
        except BrokerUnavailableError:
            for entry in entries:
                entry.failed_sends += 1
            raise
        for key in keys:
            del self._entries[key]
        position = 0
        for entry in entries:
            position += len(entry.outcomes())
            if entry.final is not None:  # the final outcome is an entry's last one
                status = settled[position - 1].status
                self.report(entry, entry.final.op, status is not None)
                if status is not None and self._accepted is not None:
                    self._accepted(entry, entry.final.op, status)
        return claimed

    def report(self, entry: Entry, op: Op, accepted: bool, *, by_child: bool = False) -> None:
        """Log what became of a final outcome (``by_child``: one a child settled itself, see
        ``direct``); count a refusal."""
        if accepted:
            if op is Op.ACK and info_enabled():
                how = " (settled by its child)" if by_child else ""
                self._log(entry.message).info("succeeded in {:.3f}s{}", entry.ran, how)
            return
        self.refused += 1
        what = f"finished in {entry.ran:.3f}s but its result" if op is Op.ACK else f"its {op}"
        maybe = " (or an earlier send of it went through)" if entry.failed_sends else ""
        self._log(entry.message).warning(
            "{} was refused: the lease was lost{}; the task may run twice (refused so far: {})",
            what, maybe, self.refused,
        )  # fmt: skip

    def log_unsent(self) -> None:
        """The worker is exiting without the backend: say, per task, what was not sent."""
        for entry in self._entries.values():
            ops = ", ".join(outcome.op for outcome in entry.outcomes())
            self._log(entry.message).warning(
                "not sent ({}): the backend does not answer; the task comes back to the "
                "queue when its lease runs out", ops,
            )  # fmt: skip
