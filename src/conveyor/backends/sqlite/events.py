"""A queue's event log on SQLite: the ``events`` table the triggers fill (``events_sql``).

A reader uses a connection of its own (read-only work, no transaction with the writer's
connection, so it never sees an uncommitted event), and waits with a bounded poll of
``PRAGMA data_version`` (cheap: shared memory), as the queue's wake-up does.
"""

from __future__ import annotations

import sqlite3
import time

from ..eventlog import EventLog, LiveEvent, reset_event
from . import events_sql
from .connection import Database

_POLL_SECONDS = 0.005


class SqliteEventLog(EventLog):
    def __init__(self, database: Database, queue_name: str) -> None:
        self.queue_name = queue_name
        self._database = database
        self._own: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._database.path == ":memory:":
            return self._database.db()
        if self._own is None:
            self._own = sqlite3.connect(
                self._database.path, timeout=self._database.busy_timeout,
                isolation_level=None, check_same_thread=False,
            )  # fmt: skip
        return self._own

    def tail(self) -> str:
        with self._database.errors():
            return str(self._conn().execute(events_sql.NEWEST).fetchone()[0])

    def read(self, after: str, count: int, block: float) -> list[LiveEvent]:
        try:
            position = int(after or 0)
        except ValueError:
            position = 0
        deadline = time.monotonic() + max(block, 0)
        with self._database.errors():
            conn = self._conn()
            seen = conn.execute("PRAGMA data_version").fetchone()[0]
            while True:
                out = self._read(conn, position, count)
                if out or time.monotonic() >= deadline:
                    return out
                while time.monotonic() < deadline:
                    time.sleep(_POLL_SECONDS)
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                    if version != seen:
                        seen = version
                        break

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
        with self._database.errors():
            rows = (
                self._conn()
                .execute(events_sql.COUNTERS, (self.queue_name, self.queue_name))
                .fetchall()
            )
        return {str(name): int(n) for name, n in rows}

    def close(self) -> None:
        if self._own is not None:
            conn, self._own = self._own, None
            conn.close()
