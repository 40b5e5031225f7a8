"""What spans the queues of one SQLite file: live workers, stop requests, queue names."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..base import ServerRegistry
from . import sql
from .connection import Database

_STOP = "UPDATE workers SET stop_requested = 1 WHERE expires_at >= ?"


class SqliteRegistry(ServerRegistry):
    def __init__(self, database: Database) -> None:
        self._database = database
        self._noted: set[str] = set()  # queue names opened here that hold no task yet

    def register_worker(self, worker_id: str, info_json: str, ttl: float) -> bool:
        with self._database.write() as now:
            db = self._database.db()
            db.execute("DELETE FROM workers WHERE expires_at < ?", (now,))
            row = db.execute(sql.HEARTBEAT, (worker_id, info_json, now, now + ttl)).fetchone()
        return bool(row and row[0])

    def unregister_worker(self, worker_id: str) -> None:
        with self._database.write():
            self._database.db().execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def list_workers(self) -> Sequence[str]:
        with self._database.errors():
            rows = self._database.db().execute(
                "SELECT info FROM workers WHERE expires_at >= ? ORDER BY id", (time.time(),)
            )
            return [str(row[0]) for row in rows]

    def request_stop(self, worker_id: str | None) -> int:
        with self._database.write() as now:
            db = self._database.db()
            if worker_id is None:
                return int(db.execute(_STOP, (now,)).rowcount)
            return int(db.execute(f"{_STOP} AND id = ?", (now, worker_id)).rowcount)

    def known_queues(self) -> Sequence[str]:
        with self._database.errors():
            rows = self._database.db().execute("SELECT DISTINCT queue FROM tasks ORDER BY queue")
            names = {str(row[0]) for row in rows if row[0] is not None}
        return sorted(names | self._noted)

    def note_queue(self, queue_name: str) -> None:
        self._noted.add(queue_name)  # the file lists every queue that holds a task

    def forget_queue(self, queue_name: str) -> None:
        self._noted.discard(queue_name)

    def note_schedule(
        self, name: str, fingerprint: str, definition_json: str, writer: str,
        next_run: float | None,
    ) -> None:  # fmt: skip
        with self._database.write() as now:
            self._database.db().execute(
                """INSERT INTO schedules VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name, fingerprint)
                DO UPDATE SET definition = excluded.definition, writer = excluded.writer,
                seen_at = excluded.seen_at, next_run = excluded.next_run""",
                (name, fingerprint, definition_json, writer, now, next_run),
            )

    def advance_schedule(self, name: str, tick: float) -> None:
        with self._database.write():
            self._database.db().execute(
                """INSERT INTO schedule_runs VALUES (?, ?) ON CONFLICT (name)
                DO UPDATE SET last_tick = MAX(last_tick, excluded.last_tick)""",
                (name, tick),
            )

    def forget_schedule(self, name: str) -> None:
        with self._database.write():
            self._database.db().execute("DELETE FROM schedules WHERE name = ?", (name,))
            self._database.db().execute("DELETE FROM schedule_runs WHERE name = ?", (name,))

    def schedules(self) -> list[dict[str, Any]]:
        with self._database.errors():
            rows = (
                self._database.db()
                .execute(
                    """SELECT s.name, s.fingerprint, s.definition, s.writer, s.seen_at, s.next_run,
                r.last_tick FROM schedules s LEFT JOIN schedule_runs r ON r.name = s.name
                ORDER BY s.name, s.seen_at DESC"""
                )
                .fetchall()
            )
        fields = ("name", "fingerprint", "definition", "writer", "seen_at", "next_run",
                  "last_tick")  # fmt: skip
        return [dict(zip(fields, row, strict=True)) for row in rows]
