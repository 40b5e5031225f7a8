"""The SQLite event log (schema version 6): an ``events`` table and monotonic counters,
written by triggers on ``tasks``.

Triggers, not statements: every transition already appends one JSON line to ``history``
through ``sql.history``, in the transaction that makes it; that helper also sets
``event_line`` to the line, and a trigger on that column emits the event atomically for
every rule, including rules added later (no history text is parsed). Progress and checkpoint
change ``progress``/``steps`` without a history line; two more triggers emit those.

Ids come from ``AUTOINCREMENT``: never reused, even after the table is emptied, so a reader's
``since`` keeps its meaning; ids are global (all queues share the table), which makes a
merged follow of every queue one ordered read. The table keeps the last :data:`KEPT` events.

Counters cost nothing per event: a queue's count of an event is the rows the log still holds
plus ``event_counters``, into which the trimming (:data:`TRIM`, run with the store's
retention pass, every 1,000 claims or 60 s) folds the rows it deletes, in one transaction,
so nothing is counted twice or lost. The log so holds :data:`KEPT` events plus what came
since the last pass. Neither ever shrinks: purging or
clearing tasks leaves both alone. A push's event is read from the new row itself (no JSON).
"""

from __future__ import annotations

from typing import Any

from ...lifecycle import Event, TaskStatus

VERSION = 6
#: Events kept (all queues together); older ones are trimmed by the insert trigger.
KEPT = 100_000

_COLUMNS = "queue, task_id, event, status, attempt, progress, at, worker, note"
#: The column ``sql.history`` sets to the line it appends (added by this version).
EVENT_LINE = "event_line TEXT"


def _emit_line() -> str:
    """The INSERT of the event ``NEW.event_line`` (one JSON object) records."""
    field = "json_extract(NEW.event_line, '$.{}')"
    return f"""INSERT INTO events ({_COLUMNS}) VALUES (NEW.queue, NEW.id,
        {field.format("event")}, NEW.status, {field.format("attempt")}, NEW.progress,
        {field.format("at")}, NEW.worker, {field.format("note")});"""


def _emit_field(event: str, note: str) -> str:
    return f"""INSERT INTO events ({_COLUMNS}) VALUES (NEW.queue, NEW.id, {event}, NEW.status,
        NEW.attempts, NEW.progress, NEW.updated_at, NEW.worker, {note});"""


#: Trimming, run by the store's retention pass (in its write transaction): the events older
#: than the last ``:kept`` are folded into the counters, then deleted, in one step.
TRIM = (
    """INSERT INTO event_counters (queue, event, n) SELECT queue, event, COUNT(*) FROM events
        WHERE id <= (SELECT MAX(id) FROM events) - :kept GROUP BY queue, event
        ON CONFLICT (queue, event) DO UPDATE SET n = n + excluded.n""",
    "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - :kept",
)


def trim(conn: Any, kept: int = KEPT) -> None:
    """Fold and delete the events beyond the last ``kept`` (inside a write transaction)."""
    for statement in TRIM:
        conn.execute(statement, {"kept": kept})


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT,
        task_id TEXT, event TEXT, status TEXT, attempt INTEGER, progress REAL, at REAL,
        worker TEXT, note TEXT)""",
    "CREATE INDEX IF NOT EXISTS events_queue ON events (queue, id)",
    """CREATE TABLE IF NOT EXISTS event_counters (queue TEXT, event TEXT,
        n INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (queue, event))""",
    # A new row is pushed or scheduled (sql.INSERT writes its one history line).
    f"""CREATE TRIGGER IF NOT EXISTS tasks_event_pushed AFTER INSERT ON tasks
        WHEN COALESCE(NEW.history, '') != '' BEGIN {
        _emit_field(
            f"CASE NEW.status WHEN '{TaskStatus.SCHEDULED}' THEN '{Event.SCHEDULED}' "
            f"ELSE '{Event.PUSHED}' END",
            "NULL",
        )
    } END""",
    f"""CREATE TRIGGER IF NOT EXISTS tasks_event_transition AFTER UPDATE OF event_line
        ON tasks WHEN json_valid(NEW.event_line) BEGIN {_emit_line()} END""",
    f"""CREATE TRIGGER IF NOT EXISTS tasks_event_progress AFTER UPDATE OF progress,
        progress_message ON tasks WHEN NEW.event_line IS OLD.event_line BEGIN
        {_emit_field(f"'{Event.PROGRESS}'", "NEW.progress_message")} END""",
    f"""CREATE TRIGGER IF NOT EXISTS tasks_event_checkpoint AFTER UPDATE OF steps ON tasks
        WHEN NEW.event_line IS OLD.event_line BEGIN
        {_emit_field(f"'{Event.CHECKPOINT}'", "NULL")} END""",
)

# -- reading ----------------------------------------------------------------------------------
_FIELDS = f"id, {_COLUMNS}"
AFTER_QUEUE = f"SELECT {_FIELDS} FROM events WHERE queue = ? AND id > ? ORDER BY id LIMIT ?"
AFTER_ALL = f"SELECT {_FIELDS} FROM events WHERE id > ? ORDER BY id LIMIT ?"
OLDEST = "SELECT MIN(id) FROM events"
NEWEST = "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
COUNTERS = """SELECT event, SUM(n) FROM (SELECT event, n FROM event_counters WHERE queue = ?
    UNION ALL SELECT event, COUNT(*) FROM events WHERE queue = ? GROUP BY event) GROUP BY event"""
