"""What spans the queues of one schema: live workers, stop requests, queue names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..base import ServerRegistry
from .connection import Database


class PostgresRegistry(ServerRegistry):
    def __init__(self, database: Database) -> None:
        self._database = database
        self._s = database.schema

    def register_worker(self, worker_id: str, info_json: str, ttl: float) -> bool:
        s = self._s
        return bool(
            self._database.read(
                f"""WITH gone AS (DELETE FROM {s}.workers WHERE expires_at < {s}.now_s())
                INSERT INTO {s}.workers (id, info, last_seen, expires_at)
                VALUES (%s, %s, {s}.now_s(), {s}.now_s() + %s)
                ON CONFLICT (id) DO UPDATE SET info = excluded.info,
                    last_seen = excluded.last_seen, expires_at = excluded.expires_at
                RETURNING stop_requested""",
                (worker_id, info_json, float(ttl)),
            )
        )

    def unregister_worker(self, worker_id: str) -> None:
        self._database.reads(
            f"DELETE FROM {self._s}.workers WHERE id = %s RETURNING id", (worker_id,)
        )

    def list_workers(self) -> Sequence[str]:
        rows = self._database.reads(
            f"SELECT info FROM {self._s}.workers WHERE expires_at >= {self._s}.now_s() ORDER BY id",
            (),
        )
        return [str(row[0]) for row in rows]

    def request_stop(self, worker_id: str | None) -> int:
        s = self._s
        sql = f"""WITH stopped AS (UPDATE {s}.workers SET stop_requested = 1
            WHERE expires_at >= {s}.now_s() AND (%s::text IS NULL OR id = %s) RETURNING 1)
            SELECT count(*) FROM stopped"""
        return int(self._database.read(sql, (worker_id, worker_id)))

    def known_queues(self) -> Sequence[str]:
        s = self._s
        rows = self._database.reads(
            f"SELECT name FROM {s}.queues UNION SELECT DISTINCT queue FROM {s}.tasks", ()
        )
        return sorted(str(row[0]) for row in rows if row[0] is not None)

    def note_queue(self, queue_name: str) -> None:
        self._database.reads(
            f"""INSERT INTO {self._s}.queues (name) VALUES (%s) ON CONFLICT DO NOTHING
            RETURNING name""",
            (queue_name,),
        )

    def forget_queue(self, queue_name: str) -> None:
        self._database.reads(
            f"DELETE FROM {self._s}.queues WHERE name = %s RETURNING name", (queue_name,)
        )

    # -- schedules (conveyor.schedules) ------------------------------------------------------

    def note_schedule(
        self, name: str, fingerprint: str, definition_json: str, writer: str,
        next_run: float | None,
    ) -> None:  # fmt: skip
        s = self._s
        self._database.reads(
            f"""INSERT INTO {s}.schedules VALUES (%s, %s, %s, %s, {s}.now_s(), %s)
            ON CONFLICT (name, fingerprint) DO UPDATE SET definition = excluded.definition,
            writer = excluded.writer, seen_at = excluded.seen_at,
            next_run = excluded.next_run RETURNING name""",
            (name, fingerprint, definition_json, writer, next_run),
        )

    def advance_schedule(self, name: str, tick: float) -> None:
        self._database.reads(
            f"""INSERT INTO {self._s}.schedule_runs VALUES (%s, %s) ON CONFLICT (name)
            DO UPDATE SET last_tick = greatest({self._s}.schedule_runs.last_tick,
            excluded.last_tick) RETURNING name""",
            (name, float(tick)),
        )

    def forget_schedule(self, name: str) -> None:
        s = self._s
        self._database.reads(
            f"""WITH runs AS (DELETE FROM {s}.schedule_runs WHERE name = %s)
            DELETE FROM {s}.schedules WHERE name = %s RETURNING name""",
            (name, name),
        )

    def schedules(self) -> list[dict[str, Any]]:
        s = self._s
        rows = self._database.reads(
            f"""SELECT s.name, s.fingerprint, s.definition, s.writer, s.seen_at, s.next_run,
            r.last_tick FROM {s}.schedules s LEFT JOIN {s}.schedule_runs r ON r.name = s.name
            ORDER BY s.name, s.seen_at DESC""",
            (),
        )
        fields = ("name", "fingerprint", "definition", "writer", "seen_at", "next_run",
                  "last_tick")  # fmt: skip
        return [dict(zip(fields, row, strict=True)) for row in rows]
