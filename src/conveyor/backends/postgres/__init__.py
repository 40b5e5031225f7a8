"""The PostgreSQL backend: a schema of its own, one server-side function per transition.

``PostgresServer`` opens a small connection pool per process (psycopg 3 + psycopg_pool) and,
when a consumer first waits, one LISTEN connection outside the pool. Module map:
``connection`` (URL, pool, migrations, errors), ``schema`` (tables and PL/pgSQL
functions), ``store`` (transitions), ``records`` (reads), ``registry`` (workers and queue
names), ``wake`` (LISTEN/NOTIFY wake-ups), ``events``/``events_sql`` (the event log).

Decisions the contract leaves open:

* The URL is libpq's (``postgresql://user:pass@host:5432/db``; ``postgres://`` too) plus
  ``?schema=name`` (default ``conveyor``): several deployments can share a database.
* Claims use ``FOR UPDATE SKIP LOCKED`` in (priority desc, ready time, sequence) order:
  concurrent consumers of unkeyed tasks never wait on one another.
* Times come from the server's clock (``clock_timestamp()``), as on Redis.
* Retention deletes success, canceled and timeout rows older than ``result_ttl``; failed
  rows stay until purged (the dead-letter list).
* Events (``events_sql``): triggers on ``tasks`` write them in each transition's
  transaction; readers poll, in (transaction, id) order, behind the oldest running
  transaction, so an event committed late is never skipped.
* ``LISTEN`` does not work behind PgBouncer in transaction pooling mode: a consumer there
  would only notice new work when its wait slice ends (about a second).
"""

from __future__ import annotations

from ..base import QueueRecords, QueueStore, Server, StoreConfig
from ..eventlog import EventLog
from .connection import Database
from .events import PostgresEventLog
from .records import PostgresRecords
from .registry import PostgresRegistry
from .store import PostgresStore
from .wake import Listener

__all__ = ["PostgresServer"]


class PostgresServer(Server):
    """A PostgreSQL database (``postgresql://user:pass@host:5432/db?schema=conveyor``)."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self.database = Database(url, connect_timeout=connect_timeout)
        self.safe_url = self.database.safe_url
        self.registry = PostgresRegistry(self.database)
        self.listener = Listener(
            self.database.conninfo, self.database.options, self.database.channel
        )

    def store(self, queue_name: str, config: StoreConfig) -> QueueStore:
        self.registry.note_queue(queue_name)
        return PostgresStore(self.database, self.listener, queue_name, config)

    def records(self, queue_name: str) -> QueueRecords:
        return PostgresRecords(self.database, queue_name)

    def events(self, queue_name: str) -> EventLog:
        return PostgresEventLog(self.database, queue_name)

    def ping(self) -> None:
        from ...errors import BackendError, BrokerUnavailableError

        try:
            self.database.read("SELECT 1", ())
        except BackendError as exc:
            raise BrokerUnavailableError(str(exc)) from exc

    def close(self) -> None:
        self.listener.close()
        self.database.close()
