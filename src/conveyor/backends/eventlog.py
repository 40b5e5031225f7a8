"""The event-log seam: a queue's bounded, resumable log of task events.

Every backend writes its log in the same atomic step as the transition (the Redis scripts'
``record``, the SQLite triggers), so readers here only read. Ids are opaque strings a reader
resumes from; a reader whose id was trimmed away gets a ``reset`` event, never a gap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

#: The event a reader gets when events it had not read were trimmed: re-read the state.
RESET = "reset"


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """One event: a transition, a progress report or a checkpoint (or a ``reset``)."""

    id: str  # the backend's id in the queue's log (resume from it)
    queue: str
    task_id: str
    event: str
    status: str
    attempt: int
    progress: float
    at: float  # epoch seconds, the backend's clock
    worker: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reset_event(queue: str, at: float, event_id: str = "") -> LiveEvent:
    return LiveEvent(event_id, queue, "", RESET, "", 0, 0.0, at)


class EventLog(ABC):
    """The event log of one queue (cheap: shares its server's connection)."""

    queue_name: str

    @abstractmethod
    def tail(self) -> str:
        """The id of the newest event ('' when none): reading after it yields new ones."""

    @abstractmethod
    def read(self, after: str, count: int, block: float) -> list[LiveEvent]:
        """Up to ``count`` events after id ``after`` (oldest first), waiting up to ``block``
        seconds for one. If events after ``after`` were trimmed, the first item is a
        ``reset`` event whose id is where reading continues (the oldest event kept)."""

    @abstractmethod
    def counters(self) -> dict[str, int]:
        """Events emitted per event name since the queue began; they never go down."""

    def close(self) -> None:  # noqa: B027 (most logs hold nothing of their own)
        """Release what the log holds of its own."""
