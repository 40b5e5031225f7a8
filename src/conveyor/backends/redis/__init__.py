"""The Redis backend: one sorted set per queue, leases with fencing tokens, Lua for atomicity.

``RedisServer`` owns one client (one connection pool) per server and process; each queue's
store, records and the server's registry share it. Module map: ``target`` (the URL: one
server, Cluster or Sentinel), ``client`` (connection, errors, failover retries, scripts,
WAIT for durability), ``keys`` (a queue's key names), ``store`` (transitions), ``records``
(reads), ``registry`` (workers and queue names), ``lua/`` (the scripts).
"""

from __future__ import annotations

from ..base import QueueRecords, QueueStore, Server, StoreConfig
from ..eventlog import EventLog
from .client import RedisClient
from .events import RedisEventLog
from .records import RedisRecords
from .registry import RedisRegistry
from .store import RedisStore

__all__ = ["RedisServer"]


class RedisServer(Server):
    """A Redis server (``redis://``, ``rediss://``, ``unix://``), a Redis Cluster
    (``redis+cluster://``) or a Sentinel-watched master (``redis+sentinel://``); see
    ``target`` for the URL forms. ``durability`` (``replicas=N[,timeout=S]``) beats the
    URL's ``durability=`` parameter."""

    def __init__(
        self, url: str, *, connect_timeout: float = 5.0, durability: str | None = None
    ) -> None:
        self.client = RedisClient(url, connect_timeout=connect_timeout, durability=durability)
        self.safe_url = self.client.safe_url
        self.registry = RedisRegistry(self.client)

    def store(self, queue_name: str, config: StoreConfig) -> QueueStore:
        self.registry.note_queue(queue_name)
        return RedisStore(self.client, queue_name, config)

    def records(self, queue_name: str) -> QueueRecords:
        return RedisRecords(self.client, queue_name)

    def events(self, queue_name: str) -> EventLog:
        return RedisEventLog(self.client, queue_name)

    def ping(self) -> None:
        with self.client.translate():
            self.client.redis.ping()

    def close(self) -> None:
        self.client.close()
