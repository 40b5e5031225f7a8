"""One queue's reads on PostgreSQL: plain SELECTs, never a lock."""

from __future__ import annotations

from typing import Any

from ...lifecycle import TaskStatus
from ..base import ROW_FIELDS, QueueRecords, WaitingBands
from .connection import Database
from .schema import CLAIM_ORDER

S = TaskStatus
FIELDS = ", ".join(ROW_FIELDS)
NEWEST = "coalesce(finished_at, updated_at) DESC, seq DESC"


class PostgresRecords(QueueRecords):
    def __init__(self, database: Database, queue_name: str) -> None:
        self.queue_name = queue_name
        self._database = database
        self._t = f"{database.schema}.tasks"

    def _dicts(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        rows = self._database.reads(sql, params)
        return [dict(zip(ROW_FIELDS, row, strict=True)) for row in rows]

    def get(self, task_id: str) -> dict[str, Any] | None:
        rows = self._dicts(
            f"SELECT {FIELDS} FROM {self._t} WHERE queue = %s AND id = %s",
            (self.queue_name, task_id),
        )
        return rows[0] if rows else None

    def list(self, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        t, queue = self._t, self.queue_name
        if status is None:
            sql = f"""SELECT {FIELDS} FROM {t} WHERE queue = %s
                ORDER BY status = '{S.PENDING}' DESC,
                CASE WHEN status = '{S.PENDING}' THEN priority END DESC,
                CASE WHEN status = '{S.PENDING}' THEN ready_at END,
                CASE WHEN status = '{S.PENDING}' THEN seq END, {NEWEST} LIMIT %s OFFSET %s"""
            return self._dicts(sql, (queue, limit, offset))
        if status == S.PENDING:
            sql = f"""SELECT {FIELDS} FROM {t} WHERE queue = %s AND status = '{S.PENDING}'
                ORDER BY {CLAIM_ORDER} LIMIT %s OFFSET %s"""
            return self._dicts(sql, (queue, limit, offset))
        sql = f"""SELECT {FIELDS} FROM {t} WHERE queue = %s AND status = %s
            ORDER BY {NEWEST} LIMIT %s OFFSET %s"""
        return self._dicts(sql, (queue, status, limit, offset))

    def counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in TaskStatus}
        rows = self._database.reads(
            f"SELECT status, count(*) FROM {self._t} WHERE queue = %s GROUP BY status",
            (self.queue_name,),
        )
        for status, number in rows:
            if status in counts:
                counts[status] = int(number)
        return counts

    def recent(self, seconds: float) -> tuple[int, int, float | None]:
        done, failed, mean = self._database.reads(
            f"""SELECT count(*) FILTER (WHERE status = '{S.SUCCESS}'),
            count(*) FILTER (WHERE status = '{S.FAILED}'),
            avg(finished_at - started_at) FILTER (WHERE status = '{S.SUCCESS}'
                AND started_at IS NOT NULL)
            FROM {self._t} WHERE queue = %s AND status IN ('{S.SUCCESS}', '{S.FAILED}')
            AND finished_at >= {self._database.schema}.now_s() - %s""",
            (self.queue_name, float(seconds)),
        )[0]
        return int(done), int(failed), None if mean is None else float(mean)

    def waiting(self) -> WaitingBands:
        rows = self._database.reads(
            f"""SELECT priority, count(*), min(ready_at) FROM {self._t} WHERE queue = %s
            AND status = '{S.PENDING}' GROUP BY priority ORDER BY priority DESC""",
            (self.queue_name,),
        )
        return [(int(p), int(n), float(oldest or 0.0)) for p, n, oldest in rows]

    def preemptions(self) -> int:
        return int(
            self._database.read(
                f"SELECT coalesce(sum(preemptions), 0) FROM {self._t} WHERE queue = %s",
                (self.queue_name,),
            )
        )

    def size(self) -> int:
        return int(
            self._database.read(
                f"SELECT count(*) FROM {self._t} WHERE queue = %s AND status = '{S.PENDING}'",
                (self.queue_name,),
            )
        )

    def now(self) -> float:
        return float(self._database.read(f"SELECT {self._database.schema}.now_s()", ()))
