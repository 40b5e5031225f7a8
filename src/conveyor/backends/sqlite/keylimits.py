"""Per-key concurrency limits on SQLite (schema version 4): parking and re-admission.

A task pushed with a ``concurrency_key`` counts against its key while it is
``processing``; the key's limit is the smallest ``max_concurrency`` among the key's running
tasks and the candidate. A claim that meets a task whose key is full *parks* it (``parked =
1``: out of the ready index, still ``pending``) and goes on to the next task, so a busy key
never blocks the rest of the queue, however many of its tasks wait.

Re-admission is done by the database itself, in triggers, so that *every* exit from
``processing`` frees a slot — ack, nack, fail, cancel, lease expiry, a hand-back, a
preemption yield, a delete — including exits added later by other statements: whenever a
keyed task leaves ``processing`` (or an admitted task of the key leaves the line without
running), the head of the key's parked rows, in claim order, becomes ready again. It keeps
its ``ready_at`` and ``seq``, so it stands at the place it had. The running count is never
stored (it is ``COUNT(*)`` of the key's processing rows), so a slot cannot leak: a SIGKILLed
worker's task leaves ``processing`` when its lease is reaped, and that fires the trigger.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ...lifecycle import Event, TaskStatus
from .sql import history, q

S = TaskStatus

_HEAD = f"""SELECT rowid FROM tasks WHERE queue = OLD.queue
    AND concurrency_key = OLD.concurrency_key AND parked = 1 AND status = '{S.PENDING}'
    ORDER BY priority DESC, ready_at, seq LIMIT 1"""
_READMIT_HEAD = f"UPDATE tasks SET parked = 0 WHERE rowid = ({_HEAD});"

#: Indexes, triggers and tables of version 4 (idempotent: run by every migration after the
#: columns). The two schedule tables are the schedules registry (conveyor.schedules).
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS schedules (name TEXT, fingerprint TEXT, definition TEXT,
        writer TEXT, seen_at REAL, next_run REAL, PRIMARY KEY (name, fingerprint))""",
    "CREATE TABLE IF NOT EXISTS schedule_runs (name TEXT PRIMARY KEY, last_tick REAL)",
    """CREATE INDEX IF NOT EXISTS tasks_keyed ON tasks (queue, concurrency_key, status)
        WHERE concurrency_key IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS tasks_parked
        ON tasks (queue, concurrency_key, priority DESC, ready_at, seq) WHERE parked = 1""",
    f"""CREATE INDEX IF NOT EXISTS tasks_ready_free ON tasks (queue, priority DESC, ready_at, seq)
        WHERE status = '{S.PENDING}' AND parked = 0""",
    # One trigger for every status change of a keyed row (an unkeyed row, most of them,
    # costs one NULL test): a row leaving pending is never parked; a slot freed
    # (processing -> anything), or an admitted task that leaves the line without running
    # (pending -> canceled, timeout...), lets the key's next parked task into the line.
    f"""CREATE TRIGGER IF NOT EXISTS key_status_changed AFTER UPDATE OF status ON tasks
        WHEN OLD.concurrency_key IS NOT NULL AND OLD.status IS NOT NEW.status
        BEGIN
        UPDATE tasks SET parked = 0 WHERE rowid = NEW.rowid AND NEW.parked = 1
            AND NEW.status IS NOT '{S.PENDING}';
        UPDATE tasks SET parked = 0 WHERE rowid = ({_HEAD})
            AND (OLD.status = '{S.PROCESSING}' OR (OLD.status = '{S.PENDING}'
                 AND OLD.parked = 0 AND NEW.status IS NOT '{S.PROCESSING}'));
        END""",
    f"""CREATE TRIGGER IF NOT EXISTS key_slot_deleted AFTER DELETE ON tasks
        WHEN OLD.concurrency_key IS NOT NULL AND OLD.status = '{S.PROCESSING}'
        BEGIN {_READMIT_HEAD} END""",
)

RUNNING = f"""SELECT COUNT(*), MIN(max_concurrency) FROM tasks WHERE queue = ?
    AND concurrency_key = ? AND status = '{S.PROCESSING}'"""
PARK = f"""UPDATE tasks SET parked = 1, updated_at = :now, {history(q(Event.PARKED))}
    WHERE rowid = :rowid"""
READMIT_ONE = f"""UPDATE tasks SET parked = 0 WHERE rowid = (SELECT rowid FROM tasks
    WHERE queue = ? AND concurrency_key = ? AND parked = 1 AND status = '{S.PENDING}'
    ORDER BY priority DESC, ready_at, seq LIMIT 1)"""


def _limit(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _full(db: sqlite3.Connection, queue: str, row: sqlite3.Row) -> tuple[bool, int, int | None]:
    """Is the row's key full? Also the key's running count and its smallest limit."""
    key = row["concurrency_key"]
    if not isinstance(key, str):
        return False, 0, None
    running, smallest = db.execute(RUNNING, (queue, key)).fetchone()
    limits = [x for x in (_limit(row["max_concurrency"]), _limit(smallest)) if x is not None]
    limit = min(limits) if limits else None
    return limit is not None and int(running) >= limit, int(running), limit


def has_room(db: sqlite3.Connection, queue: str, row: sqlite3.Row) -> bool:
    """Could this pending row run now (its key has a free slot)? Changes nothing."""
    return not _full(db, queue, row)[0]


def admit(db: sqlite3.Connection, queue: str, rowid: int, row: sqlite3.Row, now: float) -> bool:
    """Inside a claim's transaction: may this pending row run now? If its key is full, park
    it (and return False). If it may run and its key keeps room after it, re-admit the
    key's next parked row too (a limit that was raised, or mixed limits, never strands one).
    """
    full, running, limit = _full(db, queue, row)
    if limit is None:
        return True
    if full:
        db.execute(PARK, {"rowid": rowid, "now": now})
        return False
    if running + 1 < limit:
        db.execute(READMIT_ONE, (queue, row["concurrency_key"]))
    return True
