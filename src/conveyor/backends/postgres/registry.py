"""What spans the queues of one schema: live workers, stop requests, queue names."""

from __future__ import annotations

from collections.abc import Sequence

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
