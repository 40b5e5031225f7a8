"""A queue's event log on Redis: the stream ``conveyor:{q}:events`` the scripts append to.

Each entry carries ``n``, the queue's event number without gaps (``HINCRBY`` in the same
script), so a reader knows when trimming (``MAXLEN ~``) took events it had not read and
returns a ``reset``. One stream per queue, read with one key per call: Cluster-safe.
"""

from __future__ import annotations

from typing import Any

from ..eventlog import EventLog, LiveEvent, reset_event
from .client import RedisClient
from .keys import QueueKeys

_START = "0-0"


def before(entry_id: str) -> str:
    """The stream id just before ``entry_id``: reading after it starts at ``entry_id``."""
    ms, seq = (int(part) for part in entry_id.split("-"))
    return f"{ms}-{seq - 1}" if seq > 0 else f"{ms - 1}-18446744073709551615"


def _parts(entry_id: str) -> tuple[int, int]:
    try:
        ms, _, seq = entry_id.partition("-")
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


class RedisEventLog(EventLog):
    def __init__(self, client: RedisClient, queue_name: str) -> None:
        self.queue_name = queue_name
        self._client = client
        self._key = QueueKeys.for_queue(queue_name).events
        self._counters = QueueKeys.for_queue(queue_name).counters
        self._known: tuple[str, int] = (_START, 0)  # the last id handed out, and its n

    def _on_master(self, action: Any) -> Any:
        return self._client.on_master(self._key, action)

    def tail(self) -> str:
        newest = self._on_master(lambda r: r.xrevrange(self._key, count=1))
        if not newest:
            return _START
        self._known = (newest[0][0], int(newest[0][1].get("n", 0)))
        return str(newest[0][0])

    def _number_of(self, after: str) -> int | None:
        """The ``n`` of id ``after``, or None when events after it were trimmed away."""
        if after == self._known[0]:
            return self._known[1]
        found = self._on_master(lambda r: r.xrange(self._key, after, after, count=1))
        if found:
            return int(found[0][1].get("n", 0))
        first = self._on_master(lambda r: r.xrange(self._key, count=1))
        if not first:
            return None if after == _START else 0  # an empty stream: nothing to miss
        first_id, first_n = first[0][0], int(first[0][1].get("n", 0))
        if _parts(after) >= _parts(first_id):
            return first_n - 1  # an id that was never an entry, inside the kept range
        if after == before(first_id) or (after == _START and first_n <= 1):
            return first_n - 1
        return None

    def read(self, after: str, count: int, block: float) -> list[LiveEvent]:
        after = after or _START
        last_n = self._number_of(after)
        out: list[LiveEvent] = []
        if last_n is None:
            first = self._on_master(lambda r: r.xrange(self._key, count=1))
            resume = before(first[0][0])
            out.append(reset_event(self.queue_name, self._client.now(self._key), resume))
            after, last_n = resume, int(first[0][1].get("n", 1)) - 1
        millis = max(1, int(min(block, self._client.max_block) * 1000))
        wait = None if out or block <= 0 else millis
        reply = self._on_master(
            lambda r: r.xread({self._key: after}, count=max(1, count), block=wait)
        )
        for entry_id, fields in reply[0][1] if reply else []:
            n = int(fields.get("n", 0))
            if n != last_n + 1:  # trimmed while we were away
                out.append(reset_event(self.queue_name, float(fields["at"]), before(entry_id)))
            out.append(self._event(entry_id, fields))
            last_n = n
            self._known = (entry_id, n)
        return out

    def _event(self, entry_id: str, fields: dict[str, str]) -> LiveEvent:
        return LiveEvent(
            id=entry_id, queue=self.queue_name, task_id=fields.get("task", ""),
            event=fields.get("event", ""), status=fields.get("status", ""),
            attempt=int(float(fields.get("attempt") or 0)),
            progress=float(fields.get("progress") or 0), at=float(fields.get("at") or 0),
            worker=fields.get("worker") or None, note=fields.get("note") or None,
        )  # fmt: skip

    def counters(self) -> dict[str, int]:
        raw = self._on_master(lambda r: r.hgetall(self._counters))
        return {name: int(value) for name, value in raw.items() if name != "events"}
