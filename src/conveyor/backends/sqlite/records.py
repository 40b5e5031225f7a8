"""One queue's reads on SQLite: plain SELECTs outside any write lock."""

from __future__ import annotations

import time
from typing import Any

from ...lifecycle import TaskStatus
from ..base import ROW_FIELDS, QueueRecords, WaitingBands
from . import sql
from .connection import Database


class SqliteRecords(QueueRecords):
    def __init__(self, database: Database, queue_name: str) -> None:
        self.queue_name = queue_name
        self._database = database

    def get(self, task_id: str) -> dict[str, Any] | None:
        with self._database.errors():
            row = self._database.db().execute(sql.GET, (self.queue_name, task_id)).fetchone()
        return None if row is None else dict(zip(ROW_FIELDS, row, strict=True))

    def list(self, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        db, queue = self._database.db(), self.queue_name
        with self._database.errors():
            if status is None:
                cursor = db.execute(sql.LIST_ALL, (queue, limit, offset))
            elif status == TaskStatus.PENDING:
                cursor = db.execute(sql.LIST_PENDING, (queue, limit, offset))
            else:
                cursor = db.execute(sql.LIST_STATUS, (queue, status, limit, offset))
            return [dict(zip(ROW_FIELDS, row, strict=True)) for row in cursor]

    def counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in TaskStatus}
        with self._database.errors():
            for status, number in self._database.db().execute(sql.COUNTS, (self.queue_name,)):
                if status in counts:
                    counts[status] = number
        return counts

    def recent(self, seconds: float) -> tuple[int, int, float | None]:
        with self._database.errors():
            since = time.time() - seconds
            done, failed, mean = (
                self._database.db().execute(sql.RECENT, (self.queue_name, since)).fetchone()
            )
        return int(done), int(failed), float(mean) if isinstance(mean, int | float) else None

    def waiting(self) -> WaitingBands:
        with self._database.errors():
            rows = (
                self._database.db().execute(sql.WAITING_BY_PRIORITY, (self.queue_name,)).fetchall()
            )
        return [
            (row[0], int(row[1]), float(row[2] or 0.0))
            for row in rows
            if isinstance(row[0], int) and isinstance(row[2], int | float)
        ]

    def preemptions(self) -> int:
        with self._database.errors():
            return int(
                self._database.db().execute(sql.PREEMPTIONS, (self.queue_name,)).fetchone()[0]
            )

    def size(self) -> int:
        with self._database.errors():
            return int(self._database.db().execute(sql.SIZE, (self.queue_name,)).fetchone()[0])

    def now(self) -> float:
        return time.time()
