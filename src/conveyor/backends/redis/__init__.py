"""The Redis backend: one sorted set per queue, leases with fencing tokens, Lua for atomicity.

``RedisServer`` owns one client (one connection pool) per server and process; each queue's
store, records and the server's registry share it. Module map: ``client`` (connection,
errors, scripts), ``keys`` (a queue's key names), ``store`` (transitions), ``records``
(reads), ``registry`` (workers and queue names), ``lua/`` (the scripts).
"""

from __future__ import annotations

from ..base import QueueRecords, QueueStore, Server, StoreConfig
from .client import RedisClient
from .records import RedisRecords
from .registry import RedisRegistry
from .store import RedisStore

__all__ = ["RedisServer"]


class RedisServer(Server):
    """A Redis server (``redis://``, ``rediss://``, ``unix://``)."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self.client = RedisClient(url, connect_timeout=connect_timeout)
        self.safe_url = self.client.safe_url
        self.registry = RedisRegistry(self.client)

    def store(self, queue_name: str, config: StoreConfig) -> QueueStore:
        self.registry.note_queue(queue_name)
        return RedisStore(self.client, queue_name, config)

    def records(self, queue_name: str) -> QueueRecords:
        return RedisRecords(self.client, queue_name)

    def ping(self) -> None:
        with self.client.translate():
            self.client.redis.ping()

    def close(self) -> None:
        self.client.close()
