"""The SQLite task store: the SQLite backend's table plus three columns for tickets.

``ticket`` is the number of the record's current broker message, ``copy`` the message
copy it was last claimed with, and ``publish_by`` the deadline of a publication in flight
(see ``store``). They are added to an existing file on
first use, so one file can hold SQLite-backend queues and RabbitMQ task records side by
side (under different queue names). Everything else — rows, history, retention, the worker
registry — is the SQLite backend's, unchanged.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ..base import Claimed, NewTask
from ..sqlite import SqliteBackend, _as_float, _timed_out
from ..sqlite_sql import COLUMNS, LIVE_IDS, NACK, NACK_CANCELED, RETRY, history
from .store import Staged, TaskStore, Ticket, TicketClaim, Unclaimed

_FINISHED = ("success", "failed", "canceled", "timeout")
_INSERT = (
    f"INSERT OR REPLACE INTO tasks ({', '.join(COLUMNS)}, ticket, publish_by) "
    f"VALUES ({', '.join('?' * (len(COLUMNS) + 2))})"
)
_OLD_TICKETS = """SELECT id, ticket FROM tasks WHERE queue = ? AND id IN
    (SELECT value FROM json_each(?))"""
_PUBLISHED = "UPDATE tasks SET publish_by = NULL WHERE queue = ? AND id = ? AND ticket = ?"
_ANY_DUE = """SELECT 1 FROM tasks WHERE queue = :queue AND ((status = 'scheduled'
    AND scheduled_for <= :now) OR publish_by <= :now) LIMIT 1"""
_DUE = """SELECT rowid FROM tasks WHERE queue = ? AND status = 'scheduled'
    AND scheduled_for <= ? ORDER BY scheduled_for, seq LIMIT ?"""
_PROMOTE = f"""UPDATE tasks SET status = 'pending', ready_at = scheduled_for, seq = :seq,
    ticket = COALESCE(ticket, 0) + 1, publish_by = :deadline, updated_at = :now,
    {history("'due'")} WHERE rowid = :rowid RETURNING id, ticket, priority"""
_LATE = "SELECT rowid FROM tasks WHERE queue = ? AND publish_by <= ? LIMIT ?"
_REPUBLISH = f"""UPDATE tasks SET publish_by = :deadline, {history("'republished'")}
    WHERE rowid = :rowid AND status = 'pending' RETURNING id, ticket, priority"""
_NOT_PUBLISHING = "UPDATE tasks SET publish_by = NULL WHERE rowid = ?"
_NEXT_DUE = "SELECT MIN(scheduled_for) FROM tasks WHERE queue = ? AND status = 'scheduled'"
_TICKET_ROW = """SELECT rowid, status, ticket, copy, attempts, expiries, cancel_requested,
    lease_until, queue_timeout, ready_at, started_at, priority, data, type, max_retries,
    retry_backoff, process_timeout, created_at, steps FROM tasks WHERE queue = ? AND id = ?"""
_TAKE = """UPDATE tasks SET status = 'processing', attempts = :attempt, expiries = :expiries,
    token = :token, lease_until = :lease, started_at = :now, updated_at = :now,
    worker = :worker, publish_by = NULL, copy = :copy, history = COALESCE(history, '') ||
    json_object('at', :now, 'event', :event, 'attempt', :attempt) || char(10)
    WHERE rowid = :rowid"""
_END = """UPDATE tasks SET status = :status, dead_reason = :reason, error = COALESCE(:error,
    error), finished_at = :now, updated_at = :now, token = NULL, lease_until = NULL,
    expiries = :expiries, publish_by = NULL, history = COALESCE(history, '') ||
    json_object('at', :now, 'event', :event, 'attempt', attempts, 'note', :note) || char(10)
    WHERE rowid = :rowid"""
_BUMP = "UPDATE tasks SET ticket = COALESCE(ticket, 0) + 1 WHERE queue = ? AND id = ?"
_RESTAGED = """UPDATE tasks SET ticket = COALESCE(ticket, 0) + 1, publish_by = ?
    WHERE queue = ? AND id = ? RETURNING ticket, priority"""


def _priority(value: Any) -> int:
    """The AMQP priority property of a stored priority (damaged values publish as 0)."""
    try:
        return max(0, min(int(value), 255))
    except (TypeError, ValueError):
        return 0


class SqliteTaskStore(SqliteBackend, TaskStore):
    """Task records of one RabbitMQ queue in a SQLite file (one host; not over NFS)."""

    def __init__(self, path: str, queue_name: str, **options: Any) -> None:
        super().__init__(path, queue_name, **options)
        with self._write():
            db = self._db()
            columns = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
            if "ticket" not in columns:
                db.execute("ALTER TABLE tasks ADD COLUMN ticket INTEGER DEFAULT 0")
            if "publish_by" not in columns:
                db.execute("ALTER TABLE tasks ADD COLUMN publish_by REAL")
            if "copy" not in columns:
                db.execute("ALTER TABLE tasks ADD COLUMN copy TEXT")
            db.execute(
                "CREATE INDEX IF NOT EXISTS tasks_publish ON tasks (queue, publish_by) "
                "WHERE publish_by IS NOT NULL"
            )

    def stage(
        self, tasks: Sequence[NewTask], grace: float, confirmed: Sequence[Ticket] = ()
    ) -> Staged:
        stored: list[bool] = []
        tickets: list[Ticket] = []
        with self._write() as now:
            db = self._db()
            db.executemany(_PUBLISHED, [(self.queue_name, t.task_id, t.number) for t in confirmed])
            ids = json.dumps([task.task_id for task in tasks])
            live = {row[0] for row in db.execute(LIVE_IDS, (self.queue_name, ids))}
            old = dict(db.execute(_OLD_TICKETS, (self.queue_name, ids)).fetchall())
            seq, rows = self._next_seq(), list[tuple[Any, ...]]()
            for task in tasks:
                stored.append(task.task_id not in live)
                if not stored[-1]:
                    continue
                live.add(task.task_id)
                number = int(old.get(task.task_id) or 0) + 1
                ready = task.delay <= 0
                row = self._new_row(task, now, seq + len(rows))
                rows.append((*row, number, now + grace if ready else None))
                if ready:
                    tickets.append(Ticket(task.task_id, number, task.priority))
            db.executemany(_INSERT, rows)
        return Staged(stored, tickets)

    def published(self, tickets: Sequence[Ticket]) -> None:
        with self._write():
            self._db().executemany(
                _PUBLISHED, [(self.queue_name, t.task_id, t.number) for t in tickets]
            )

    def due(self, limit: int, grace: float) -> tuple[list[Ticket], float | None]:
        found: list[Ticket] = []
        with self._errors():
            now = _now()
            anything = self._db().execute(_ANY_DUE, {"queue": self.queue_name, "now": now})
            if anything.fetchone() is not None:
                found = self._claim_due(limit, grace)
            next_due = _as_float(self._db().execute(_NEXT_DUE, (self.queue_name,)).fetchone()[0])
        return found, None if next_due is None else max(0.0, next_due - _now())

    def _claim_due(self, limit: int, grace: float) -> list[Ticket]:
        found: list[Ticket] = []
        with self._write() as now:
            db = self._db()
            seq = self._next_seq()
            for (rowid,) in db.execute(_DUE, (self.queue_name, now, limit)).fetchall():
                params = {"rowid": rowid, "now": now, "deadline": now + grace, "seq": seq}
                row = db.execute(_PROMOTE, params).fetchone()
                found.append(Ticket(str(row[0]), int(row[1]), _priority(row[2])))
                seq += 1
            for (rowid,) in db.execute(_LATE, (self.queue_name, now, limit)).fetchall():
                params = {"rowid": rowid, "now": now, "deadline": now + grace}
                row = db.execute(_REPUBLISH, params).fetchone()
                if row is None:  # claimed, canceled or finished meanwhile: nothing to publish
                    db.execute(_NOT_PUBLISHING, (rowid,))
                else:
                    found.append(Ticket(str(row[0]), int(row[1]), _priority(row[2])))
        return found

    def claim_ticket(self, claim: TicketClaim) -> Claimed | Unclaimed:
        self._maybe_sweep()
        with self._write() as now:
            return self._claim_ticket(now, claim)

    def ack_and_claim_ticket(
        self, task_id: str, token: str, result_json: str | None, claim: TicketClaim
    ) -> tuple[bool, Claimed | Unclaimed]:
        """One transaction, so one fsync, per task on a worker's hot path."""
        self._maybe_sweep()
        with self._write() as now:
            acked = self._ack(now, task_id, token, result_json)
            return acked, self._claim_ticket(now, claim)

    def _claim_ticket(self, now: float, claim: TicketClaim) -> Claimed | Unclaimed:
        cursor = self._db().cursor()
        cursor.row_factory = sqlite3.Row
        row = cursor.execute(_TICKET_ROW, (self.queue_name, claim.task_id)).fetchone()
        if row is None:
            return Unclaimed.MISSING
        if row["ticket"] != claim.number or row["status"] in _FINISHED:
            return Unclaimed.DROP
        expiries = int(row["expiries"] or 0)
        end = {"rowid": row["rowid"], "now": now, "error": None, "note": None}
        if row["status"] == "processing":
            if not claim.redelivered or row["copy"] != claim.copy or row["lease_until"] is None:
                return Unclaimed.DROP  # another copy while it runs, or a pulled (consumed) task
            expiries += 1
            end["expiries"] = expiries
            if row["cancel_requested"]:
                cursor.execute(_END, {**end, "status": "canceled", "reason": None,
                                      "event": "canceled"})  # fmt: skip
                return Unclaimed.DROP
            if expiries >= claim.max_deliveries:
                cursor.execute(_END, {**end, **_poison(row["attempts"])})
                return Unclaimed.DROP
            event = "redelivered"
        elif _timed_out(now, row["queue_timeout"], row["ready_at"], row["started_at"]):
            end.update(status="timeout", reason=None, event="timeout", expiries=expiries)
            cursor.execute(_END, {**end, "note": "not started in time"})
            return Unclaimed.DROP
        else:
            event = "reserved" if claim.lease_seconds is not None else "pulled"
        return self._take_row(cursor, row, now, event, expiries, claim)

    def _take_row(  # noqa: PLR0917 (private; every argument is needed)
        self,
        cursor: sqlite3.Cursor,
        row: sqlite3.Row,
        now: float,
        event: str,
        expiries: int,
        claim: TicketClaim,
    ) -> Claimed:
        try:
            attempt = int(row["attempts"] or 0) + 1
        except (TypeError, ValueError):
            attempt = 1
        token = uuid.uuid4().hex
        cursor.execute(_TAKE, {
            "rowid": row["rowid"], "now": now, "attempt": attempt, "expiries": expiries,
            "token": token, "worker": claim.consumer, "event": event, "copy": claim.copy,
            "lease": None if claim.lease_seconds is None else now + claim.lease_seconds,
        })  # fmt: skip
        task_id = cursor.execute("SELECT id FROM tasks WHERE rowid = ?", (row["rowid"],))
        return Claimed(
            task_id=str(task_id.fetchone()[0]), token=token, attempts=attempt,
            priority=row["priority"], data_json=row["data"],
            type=None if row["type"] is None else str(row["type"]),
            max_retries=row["max_retries"], retry_backoff=row["retry_backoff"],
            process_timeout=row["process_timeout"], created_at=row["created_at"],
            steps_json=row["steps"],
        )  # fmt: skip

    def requeue(
        self, task_id: str, token: str, delay: float, error_json: str | None, count_attempt: bool
    ) -> bool | None:
        later = delay > 0
        event = ("retry_scheduled" if later else "requeued") if count_attempt else "interrupted"
        with self._write() as now:
            if self._update(NACK_CANCELED, now, task_id, token=token, error=error_json):
                return False
            changed = self._update(
                NACK, now, task_id, token=token, error=error_json, event=event,
                status="scheduled" if later else "pending", due=now + delay if later else None,
                ready=None if later else now, seq=self._next_seq(),
                give_back=int(not count_attempt),
            )  # fmt: skip
            if not changed:
                return None
            if later:  # the held message must not come back early if its ack is lost
                self._db().execute(_BUMP, (self.queue_name, task_id))
            return not later

    def restage(self, task_id: str, grace: float) -> Ticket | None:
        with self._write() as now:
            if not self._update(RETRY, now, task_id, seq=self._next_seq()):
                return None
            row = self._db().execute(_RESTAGED, (now + grace, self.queue_name, task_id)).fetchone()
        return Ticket(task_id, int(row[0]), _priority(row[1]))


def _poison(attempts: Any) -> dict[str, Any]:
    message = f"delivered {attempts} times without an ack (its consumer's connection closed)"
    error = json.dumps({"type": "PoisonTask", "message": message, "traceback": None})
    return {"status": "failed", "reason": "poison", "event": "dead", "note": "poison",
            "error": error}  # fmt: skip


def _now() -> float:
    return time.time()
