"""One queue's reads on Redis: plain commands, pipelined; a damaged entry never fails them.

Every key read here has the queue's hash tag, so on a Redis Cluster each pipeline goes to
the one master holding the queue's slot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ...lifecycle import TaskStatus
from ..base import QueueRecords, WaitingBands
from .client import RedisClient, wire
from .keys import QueueKeys

T = TypeVar("T")
#: Successes sampled for the mean run time in ``recent`` (keeps stats() cheap on busy queues).
_RUNTIME_SAMPLE = 1000


class RedisRecords(QueueRecords):
    def __init__(self, client: RedisClient, queue_name: str) -> None:
        self.queue_name = queue_name
        self._client = client
        self._keys = QueueKeys.for_queue(queue_name)

    def _read(self, action: Callable[[Any], T]) -> T:
        """Run reads on the master that holds the queue (on a cluster, its node's client)."""
        return self._client.on_master(self._keys.pending, action)

    def _rows(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        def read(redis: Any) -> list[Any]:
            pipe = redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hgetall(wire(self._keys.task(task_id)))
            return list(pipe.execute(raise_on_error=False))

        replies = self._read(read) if ids else []
        rows = []
        for task_id, reply in zip(ids, replies, strict=True):
            if isinstance(reply, Exception):  # not a hash: garbage someone wrote by hand
                # Shown as a damaged status (failed), and so still listed under the index
                # that holds it.
                rows.append({"id": task_id, "status": "(the record is not a hash)",
                             "dead_reason": "malformed"})  # fmt: skip
            elif reply:
                rows.append({"id": task_id, **reply})
        return rows

    def get(self, task_id: str) -> dict[str, Any] | None:
        rows = self._rows([task_id])
        return rows[0] if rows else None

    def list(self, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        if limit == 0:
            return []
        if status is not None:
            key, stop = self._keys.index(status), offset + limit - 1

            def read(redis: Any) -> list[Any]:
                if status == TaskStatus.PROCESSING:  # leased first, then pulled ones
                    ids = redis.zrange(key, 0, stop) + redis.zrange(self._keys.pulled, 0, stop)
                    return list(ids[offset : offset + limit])
                if status == TaskStatus.PENDING:  # ready ones in claim order, then parked
                    ids = redis.zrange(key, 0, stop) + redis.zrange(self._keys.parked, 0, stop)
                    return list(ids[offset : offset + limit])
                if status == TaskStatus.SCHEDULED:
                    return list(redis.zrange(key, offset, stop))
                return list(redis.zrevrange(key, offset, stop))

            return self._rows([str(task_id) for task_id in self._read(read)])
        rows = []
        for each in TaskStatus:
            rows += self.list(each.value, offset + limit, 0)
        rows.sort(key=lambda row: _number(row.get("updated_at")), reverse=True)
        return rows[offset : offset + limit]

    def counts(self) -> dict[str, int]:
        def read(redis: Any) -> list[Any]:
            pipe = redis.pipeline(transaction=False)
            for status in TaskStatus:
                pipe.zcard(self._keys.index(status.value))
            pipe.zcard(self._keys.pulled)
            pipe.zcard(self._keys.parked)
            return list(pipe.execute())

        *replies, pulled, parked = self._read(read)
        counts = {status.value: int(n) for status, n in zip(TaskStatus, replies, strict=True)}
        counts[TaskStatus.PROCESSING.value] += int(pulled)
        counts[TaskStatus.PENDING.value] += int(parked)
        return counts

    def recent(self, seconds: float) -> tuple[int, int, float | None]:
        since = self.now() - seconds

        def read(redis: Any) -> tuple[Any, Any, list[Any]]:
            pipe = redis.pipeline(transaction=False)
            pipe.zcount(self._keys.done("success"), since, "+inf")
            pipe.zcount(self._keys.done("failed"), since, "+inf")
            pipe.zrevrangebyscore(self._keys.done("success"), "+inf", since, 0, _RUNTIME_SAMPLE)
            done, failed, ids = pipe.execute()
            pipe = redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hmget(wire(self._keys.task(task_id)), "started_at", "finished_at")
            return done, failed, list(pipe.execute(raise_on_error=False)) if ids else []

        done, failed, times = self._read(read)
        runs = [
            _number(end) - _number(start)
            for start, end in (t for t in times if isinstance(t, list))
            if start and end
        ]
        return int(done), int(failed), (sum(runs) / len(runs) if runs else None)

    def waiting(self) -> WaitingBands:
        reply = self._client.run("waiting", self._keys.all, (self.queue_name, "0", "", "30"))
        if reply and reply[0] == "aged":
            return super().waiting()  # aged scores have no bands: sample the line
        return [
            (int(reply[i]), int(reply[i + 1]), _number(reply[i + 2]))
            for i in range(0, len(reply), 3)
        ]

    def preemptions(self) -> int:
        return int(_number(self._read(lambda redis: redis.get(self._keys.preemptions))))

    def size(self) -> int:
        """Pending tasks: ready ones and those parked behind a full concurrency key."""

        def read(redis: Any) -> int:
            pipe = redis.pipeline(transaction=False)
            pipe.zcard(self._keys.pending)
            pipe.zcard(self._keys.parked)
            return sum(int(n) for n in pipe.execute())

        return self._read(read)

    def now(self) -> float:
        """The clock of the master holding this queue: the one its scripts stamp times with."""
        return self._client.now(self._keys.pending)


def _number(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0
