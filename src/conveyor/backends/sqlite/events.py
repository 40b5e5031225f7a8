"""A queue's event log on SQLite: the ``events`` table the triggers fill (``events_sql``).

A reader uses a connection of its own (read-only work, no transaction with the writer's
connection, so it never sees an uncommitted event), and waits with a bounded poll of
``PRAGMA data_version`` (cheap: shared memory), as the queue's wake-up does.

That connection is used from several threads (a follower of many queues reads each in a
thread; the API closes the log from another when the client goes), and Python's sqlite3
crashes the process when a connection is closed while another thread runs a statement on
it. So every use holds a lock, never across the poll's sleep, and a closed log stays
closed: its readers get nothing more.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ..eventlog import EventLog, LiveEvent, reset_event
from . import events_sql
from .connection import Database

_POLL_SECONDS = 0.005
_T = TypeVar("_T")


class SqliteEventLog(EventLog):
    def __init__(self, database: Database, queue_name: str) -> None:
        self.queue_name = queue_name
        self._database = database
        self._own: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _conn(self) -> sqlite3.Connection:
        if self._database.path == ":memory:":
            return self._database.db()
        if self._own is None:
            self._own = sqlite3.connect(
                self._database.path, timeout=self._database.busy_timeout,
                isolation_level=None, check_same_thread=False,
            )  # fmt: skip
        return self._own

    def _use(self, work: Callable[[sqlite3.Connection], _T]) -> _T | None:
        """``work`` on the connection under the lock; None once the log is closed."""
        with self._lock, self._database.errors():
            if self._closed:
                return None
            return work(self._conn())

    def tail(self) -> str:
        newest = self._use(lambda conn: str(conn.execute(events_sql.NEWEST).fetchone()[0]))
        return "0" if newest is None else newest

    def read(self, after: str, count: int, block: float) -> list[LiveEvent]:
        try:
            position = int(after or 0)
        except ValueError:
            position = 0
        deadline = time.monotonic() + max(block, 0)
        seen = self._use(_data_version)
        while seen is not None:
            out = self._use(lambda conn: self._read(conn, position, count))
            if out is None or out or time.monotonic() >= deadline:
                return out or []
            while time.monotonic() < deadline:
                time.sleep(_POLL_SECONDS)
                version = self._use(_data_version)
                if version != seen:
                    seen = version
                    break
        return []  # closed

    def _read(self, conn: sqlite3.Connection, position: int, count: int) -> list[LiveEvent]:
        out: list[LiveEvent] = []
        oldest = conn.execute(events_sql.OLDEST).fetchone()[0]
        if oldest is None:
            oldest = int(conn.execute(events_sql.NEWEST).fetchone()[0]) + 1
        if position < oldest - 1:  # events after `position` were trimmed away
            position = oldest - 1
            out.append(reset_event(self.queue_name, time.time(), str(position)))
        rows = conn.execute(events_sql.AFTER_QUEUE, (self.queue_name, position, max(1, count)))
        for row in rows:
            event_id, queue, task_id, event, status, attempt, progress, at, worker, note = row
            out.append(
                LiveEvent(
                    str(event_id), str(queue), str(task_id), str(event), str(status or ""),
                    int(attempt or 0), float(progress or 0), float(at or 0),
                    worker or None, note,
                )
            )  # fmt: skip
        return out

    def counters(self) -> dict[str, int]:
        rows = self._use(
            lambda conn: conn.execute(
                events_sql.COUNTERS, (self.queue_name, self.queue_name)
            ).fetchall()
        )
        return {str(name): int(n) for name, n in rows or []}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._own is not None:
                conn, self._own = self._own, None
                conn.close()


def _data_version(conn: sqlite3.Connection) -> int:
    """Changes whenever another connection commits (``PRAGMA data_version``)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])
