"""The SQLite backend: one WAL-mode file shared by every worker process on one host.

``SqliteServer`` opens the file once per process; each queue's store and records, and the
registry, share its connection. Module map: ``connection`` (file, schema, migrations,
errors, transactions), ``sql`` (the statements), ``store`` (transitions), ``records``
(reads), ``registry`` (workers and queue names).

Decisions the contract leaves open:

* ``list(None)`` returns pending rows first in claim order, then the rest newest first.
* Retention deletes success, canceled and timeout rows older than ``result_ttl``; failed
  rows stay until purged.
* WAL does not work on network filesystems: keep the file on a local disk.
"""

from __future__ import annotations

from ..base import QueueRecords, QueueStore, Server, StoreConfig
from ..eventlog import EventLog
from ..table import sqlite_path_from_url
from .connection import Database
from .events import SqliteEventLog
from .records import SqliteRecords
from .registry import SqliteRegistry
from .store import SqliteStore

__all__ = ["SqliteServer"]


class SqliteServer(Server):
    """A SQLite file (``sqlite:///relative.db``, ``sqlite:////absolute.db``)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        busy_timeout: float = 30.0,
        synchronous: str = "FULL",
        create: bool = True,
    ) -> None:
        self.database = Database(
            sqlite_path_from_url(url), busy_timeout=busy_timeout, synchronous=synchronous,
            create=create,
        )  # fmt: skip
        self.safe_url = self.database.safe_url
        self.registry = SqliteRegistry(self.database)

    def store(self, queue_name: str, config: StoreConfig) -> QueueStore:
        self.registry.note_queue(queue_name)
        return SqliteStore(self.database, queue_name, config)

    def records(self, queue_name: str) -> QueueRecords:
        return SqliteRecords(self.database, queue_name)

    def events(self, queue_name: str) -> EventLog:
        return SqliteEventLog(self.database, queue_name)

    def ping(self) -> None:
        from ...errors import BackendError, BrokerUnavailableError

        try:
            with self.database.errors():
                self.database.db().execute("SELECT 1 FROM tasks LIMIT 1").fetchall()
        except BackendError as exc:
            raise BrokerUnavailableError(str(exc)) from exc

    def close(self) -> None:
        self.database.close()
