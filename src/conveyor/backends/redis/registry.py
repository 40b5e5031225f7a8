"""What spans the queues of one Redis deployment: live workers, stop requests, queue names.

Every registry key carries the hash tag ``{conveyor}`` (``conveyor:registry:{conveyor}:...``),
so on a Redis Cluster they all live in one slot and every multi-key command and pipeline
here is legal; the registry is a few small keys written every few seconds, so one shard
holding it costs nothing. The prefix ``conveyor:registry:`` can never be a queue's
(``conveyor:{queue}:...``), so purging a queue never touches it.

Upgrade: before this layout (one server only) the keys were ``conveyor:workers``,
``conveyor:workers:<id>``, ``conveyor:workers:stop-all`` and ``conveyor:queues``. They are
still read (queue names, workers of an older version still running) and stop requests are
written to both, so a rolling upgrade sees every worker; upgraded workers re-register under
the new keys at their next heartbeat, and the old entries expire with their TTL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..base import ServerRegistry
from .client import RedisClient

_TAG = "conveyor:registry:{conveyor}"
_WORKERS = f"{_TAG}:workers"  # ZSET worker id -> last heartbeat
_STOP_ALL = f"{_TAG}:stop-all"  # STRING time of the latest "stop every worker"
_QUEUES = f"{_TAG}:queues"  # SET queue names
_SCHEDULES = f"{_TAG}:schedules"  # HASH name NUL fingerprint -> JSON what its writer runs
_SCHEDULE_LAST = f"{_TAG}:schedule-last"  # ZSET name -> latest tick pushed (ZADD GT)
_LEGACY_WORKERS = "conveyor:workers"
_LEGACY_STOP_ALL = "conveyor:workers:stop-all"
_LEGACY_QUEUES = "conveyor:queues"
_STOP_TTL = 24 * 3600


def _info(worker_id: str) -> str:
    return f"{_TAG}:worker:{worker_id}"  # STRING the worker's info JSON, expiring


def _stop(worker_id: str) -> str:
    return f"{_TAG}:stop:{worker_id}"


def _legacy_info(worker_id: str) -> str:
    return f"{_LEGACY_WORKERS}:{worker_id}"


def _legacy_stop(worker_id: str) -> str:
    return f"{_LEGACY_WORKERS}:{worker_id}:stop"


class RedisRegistry(ServerRegistry):
    def __init__(self, client: RedisClient) -> None:
        self._client = client

    def register_worker(self, worker_id: str, info_json: str, ttl: float) -> bool:
        now = self._client.now(_WORKERS)

        def beat() -> list[Any]:
            pipe = self._client.redis.pipeline(transaction=False)
            pipe.set(_info(worker_id), info_json, px=int(ttl * 1000))
            pipe.zadd(_WORKERS, {worker_id: now})
            pipe.zremrangebyscore(_WORKERS, "-inf", now - ttl)
            pipe.get(_stop(worker_id))
            pipe.get(_STOP_ALL)
            pipe.get(_LEGACY_STOP_ALL)  # written by an older `conveyor stop` (--all, or
            pipe.get(_legacy_stop(worker_id))  # this worker while it ran the older version)
            return list(pipe.execute())

        *_, stop_one, stop_all, legacy_stop_all, legacy_stop = self._client.call(beat)
        try:
            started = float(json.loads(info_json).get("started_at", 0))
        except (ValueError, TypeError, AttributeError):
            started = 0.0
        asked = [float(at) for at in (stop_all, legacy_stop_all) if _number(at) is not None]
        stopped = stop_one is not None or legacy_stop is not None
        return stopped or any(at >= started for at in asked)

    def unregister_worker(self, worker_id: str) -> None:
        def remove() -> None:
            pipe = self._client.redis.pipeline(transaction=False)
            pipe.zrem(_WORKERS, worker_id)
            pipe.delete(_info(worker_id))  # one key per DEL: a cluster pipeline needs it
            pipe.delete(_stop(worker_id))
            pipe.zrem(_LEGACY_WORKERS, worker_id)  # its entry from before the upgrade
            pipe.delete(_legacy_info(worker_id))
            pipe.delete(_legacy_stop(worker_id))
            pipe.execute()

        self._client.call(remove)

    def list_workers(self) -> Sequence[str]:
        def read() -> list[str]:
            redis = self._client.redis
            current = [str(worker_id) for worker_id in redis.zrange(_WORKERS, 0, -1)]
            legacy = [str(worker_id) for worker_id in redis.zrange(_LEGACY_WORKERS, 0, -1)]
            legacy = [worker_id for worker_id in legacy if worker_id not in set(current)]
            pipe = redis.pipeline(transaction=False)
            for worker_id in current:
                pipe.get(_info(worker_id))
            for worker_id in legacy:
                pipe.get(_legacy_info(worker_id))
            return [str(info) for info in pipe.execute() if info]

        return self._client.call(read)

    def request_stop(self, worker_id: str | None) -> int:
        redis = self._client.redis
        if worker_id is None:
            now = self._client.now(_WORKERS)

            def stop_all() -> None:
                redis.set(_STOP_ALL, now, ex=_STOP_TTL)
                redis.set(_LEGACY_STOP_ALL, now, ex=_STOP_TTL)  # workers of an older version

            self._client.call(stop_all)
            return len(self.list_workers())

        def stop_one() -> int:
            if redis.exists(_info(worker_id)):
                redis.set(_stop(worker_id), "1", ex=_STOP_TTL)
            elif redis.exists(_legacy_info(worker_id)):
                redis.set(_legacy_stop(worker_id), "1", ex=_STOP_TTL)
            else:
                return 0
            return 1

        return self._client.call(stop_one)

    def known_queues(self) -> Sequence[str]:
        def read() -> list[str]:
            redis = self._client.redis
            names = set(redis.smembers(_QUEUES)) | set(redis.smembers(_LEGACY_QUEUES))
            return sorted(str(name) for name in names)

        return self._client.call(read)

    def note_queue(self, queue_name: str) -> None:
        self._client.call(lambda: self._client.redis.sadd(_QUEUES, queue_name))

    def forget_queue(self, queue_name: str) -> None:
        def forget() -> None:
            self._client.redis.srem(_QUEUES, queue_name)
            self._client.redis.srem(_LEGACY_QUEUES, queue_name)

        self._client.call(forget)

    def note_schedule(
        self, name: str, fingerprint: str, definition_json: str, writer: str,
        next_run: float | None,
    ) -> None:  # fmt: skip
        entry = {"definition": definition_json, "writer": writer,
                 "seen_at": self._client.now(_SCHEDULES), "next_run": next_run}  # fmt: skip
        field = f"{name}\0{fingerprint}"
        self._client.call(lambda: self._client.redis.hset(_SCHEDULES, field, json.dumps(entry)))

    def advance_schedule(self, name: str, tick: float) -> None:
        self._client.call(lambda: self._client.redis.zadd(_SCHEDULE_LAST, {name: tick}, gt=True))

    def forget_schedule(self, name: str) -> None:
        def forget() -> None:
            redis = self._client.redis
            fields = [f for f in redis.hkeys(_SCHEDULES) if str(f).partition("\0")[0] == name]
            if fields:
                redis.hdel(_SCHEDULES, *fields)
            redis.zrem(_SCHEDULE_LAST, name)

        self._client.call(forget)

    def schedules(self) -> list[dict[str, Any]]:
        def read() -> tuple[dict[Any, Any], list[Any]]:
            pipe = self._client.redis.pipeline(transaction=False)
            pipe.hgetall(_SCHEDULES)
            pipe.zrange(_SCHEDULE_LAST, 0, -1, withscores=True)
            entries, last = pipe.execute()
            return entries, last

        entries, last = self._client.call(read)
        last_ticks = {str(name): float(score) for name, score in last}
        rows = []
        for field, value in entries.items():
            name, _, fingerprint = str(field).partition("\0")
            try:
                entry = json.loads(value)
            except ValueError:
                continue  # a damaged entry is left out, never fails the listing
            rows.append({"name": name, "fingerprint": fingerprint,
                         "definition": entry.get("definition"), "writer": entry.get("writer"),
                         "seen_at": entry.get("seen_at"), "next_run": entry.get("next_run"),
                         "last_tick": last_ticks.get(name)})  # fmt: skip
        rows.sort(key=lambda row: (row["name"], -(_number(row["seen_at"]) or 0.0)))
        return rows


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
