"""Follow the event logs of one or many queues, merged into one iterator.

Each queue's log is read on its own (one key per Redis call, so Redis Cluster never sees a
read across slots); with several queues, one thread per queue blocks on its log and the
events meet in one in-process queue. Per queue, events keep their order; across queues they
come in the order they were read. The iterator yields ``None`` when nothing came within
``idle`` seconds, so a caller can send a keep-alive or notice it should stop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

from ..backends.eventlog import RESET, EventLog, LiveEvent

_BATCH = 200


class Follower:
    """Positions in each log (``positions``: queue -> id), advanced as events are yielded."""

    def __init__(
        self,
        logs: Sequence[EventLog],
        positions: dict[str, str] | None = None,
        *,
        task_id: str | None = None,
        idle: float = 1.0,
    ) -> None:
        self.logs = list(logs)
        given = positions or {}
        self.positions = {
            log.queue_name: given.get(log.queue_name) or log.tail() for log in self.logs
        }
        self.task_id = task_id
        self.idle = idle
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def accept(self, event: LiveEvent) -> bool:
        """Advance past ``event``; True when the caller wants it (its task, or a reset)."""
        self.positions[event.queue] = event.id
        return self.task_id is None or event.event == RESET or event.task_id == self.task_id

    def __iter__(self) -> Iterator[LiveEvent | None]:
        for batch in self.batches():
            if not batch:
                yield None
            for event in batch:
                if self.accept(event):
                    yield event

    def batches(self) -> Iterator[list[LiveEvent]]:
        """Events as they are read, a batch at a time (empty after ``idle`` seconds without
        any); the caller passes each to :meth:`accept`, which advances the positions."""
        if len(self.logs) == 1:
            yield from self._one(self.logs[0])
        else:
            yield from self._many()

    def _one(self, log: EventLog) -> Iterator[list[LiveEvent]]:
        after = self.positions[log.queue_name]
        while not self._stop.is_set():
            events = log.read(after, _BATCH, self.idle)
            if events:
                after = events[-1].id
            yield events

    def _many(self) -> Iterator[list[LiveEvent]]:
        inbox: queue.Queue[LiveEvent | BaseException] = queue.Queue(maxsize=10_000)

        def pump(log: EventLog, after: str) -> None:
            try:
                while not self._stop.is_set():
                    for event in log.read(after, _BATCH, self.idle):
                        after = event.id
                        inbox.put(event)
            except BaseException as exc:  # handed to the consumer, which raises it
                inbox.put(exc)

        threads = [
            threading.Thread(target=pump, args=(log, self.positions[log.queue_name]),
                             name=f"events-{log.queue_name}", daemon=True)
            for log in self.logs
        ]  # fmt: skip
        for thread in threads:
            thread.start()
        try:
            while not self._stop.is_set():
                batch: list[LiveEvent] = []
                try:
                    item = inbox.get(timeout=self.idle)
                    while True:
                        if isinstance(item, BaseException):
                            raise item
                        batch.append(item)
                        if len(batch) >= _BATCH:
                            break
                        item = inbox.get_nowait()
                except queue.Empty:
                    pass
                yield batch
        finally:
            self._stop.set()
