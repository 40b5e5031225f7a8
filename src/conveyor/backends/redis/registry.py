"""What spans the queues of one Redis server: live workers, stop requests, queue names.

The registry keys live outside any queue's hash tag (``conveyor:workers``,
``conveyor:queues``) and are touched with plain commands, not scripts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..base import ServerRegistry
from .client import RedisClient

_WORKERS = "conveyor:workers"
_STOP_ALL = "conveyor:workers:stop-all"
_QUEUES = "conveyor:queues"
_STOP_TTL = 24 * 3600


class RedisRegistry(ServerRegistry):
    def __init__(self, client: RedisClient) -> None:
        self._client = client

    def register_worker(self, worker_id: str, info_json: str, ttl: float) -> bool:
        redis = self._client.redis
        now = self._client.now()
        with self._client.translate():
            pipe = redis.pipeline(transaction=False)
            pipe.set(f"{_WORKERS}:{worker_id}", info_json, px=int(ttl * 1000))
            pipe.zadd(_WORKERS, {worker_id: now})
            pipe.zremrangebyscore(_WORKERS, "-inf", now - ttl)
            pipe.get(f"{_WORKERS}:{worker_id}:stop")
            pipe.get(_STOP_ALL)
            *_, stop_one, stop_all = pipe.execute()
        try:
            started = float(json.loads(info_json).get("started_at", 0))
        except (ValueError, TypeError, AttributeError):
            started = 0.0
        return stop_one is not None or (stop_all is not None and float(stop_all) >= started)

    def unregister_worker(self, worker_id: str) -> None:
        with self._client.translate():
            pipe = self._client.redis.pipeline(transaction=False)
            pipe.zrem(_WORKERS, worker_id)
            pipe.delete(f"{_WORKERS}:{worker_id}", f"{_WORKERS}:{worker_id}:stop")
            pipe.execute()

    def list_workers(self) -> Sequence[str]:
        redis = self._client.redis
        with self._client.translate():
            ids = redis.zrange(_WORKERS, 0, -1)
            pipe = redis.pipeline(transaction=False)
            for worker_id in ids:
                pipe.get(f"{_WORKERS}:{worker_id!s}")
            return [str(info) for info in pipe.execute() if info]

    def request_stop(self, worker_id: str | None) -> int:
        redis = self._client.redis
        if worker_id is None:
            now = self._client.now()
            with self._client.translate():
                redis.set(_STOP_ALL, now, ex=_STOP_TTL)
            return len(self.list_workers())
        with self._client.translate():
            if not redis.exists(f"{_WORKERS}:{worker_id}"):
                return 0
            redis.set(f"{_WORKERS}:{worker_id}:stop", "1", ex=_STOP_TTL)
        return 1

    def known_queues(self) -> Sequence[str]:
        with self._client.translate():
            return sorted(str(name) for name in self._client.redis.smembers(_QUEUES))

    def note_queue(self, queue_name: str) -> None:
        with self._client.translate():
            self._client.redis.sadd(_QUEUES, queue_name)

    def forget_queue(self, queue_name: str) -> None:
        with self._client.translate():
            self._client.redis.srem(_QUEUES, queue_name)
