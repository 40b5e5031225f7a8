"""The SQL of the SQLite backend: the schema and one statement per operation.

Kept apart from ``sqlite.py`` so the backend reads as the sequence of its transactions, and
so the RabbitMQ backend's SQLite task store can reuse these statements instead of copying
them. Named parameters (``:queue``, ``:id``, ``:token``, ``:now``) are bound by the caller.
"""

from __future__ import annotations

from .base import ROW_FIELDS

SCHEMA_VERSION = 2
COLUMNS = (*ROW_FIELDS, "token", "lease_until", "ready_at", "seq")
FIELDS = ", ".join(ROW_FIELDS)
SCHEMA = (
    # Few constraints on purpose: a damaged row must stay readable so it can be dead-lettered.
    """CREATE TABLE IF NOT EXISTS tasks (
        queue TEXT, id TEXT, type TEXT, priority INTEGER, data TEXT, status TEXT,
        attempts INTEGER DEFAULT 0, expiries INTEGER DEFAULT 0, max_retries INTEGER,
        retry_backoff REAL, queue_timeout REAL, process_timeout REAL, created_at REAL,
        scheduled_for REAL, started_at REAL, finished_at REAL, updated_at REAL,
        progress REAL DEFAULT 0, progress_message TEXT, result TEXT, error TEXT,
        dead_reason TEXT, cancel_requested INTEGER DEFAULT 0, history TEXT DEFAULT '',
        steps TEXT, worker TEXT, token TEXT, lease_until REAL, ready_at REAL, seq INTEGER,
        PRIMARY KEY (queue, id))""",
    """CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (queue, priority DESC, ready_at, seq)
        WHERE status = 'pending'""",
    """CREATE INDEX IF NOT EXISTS tasks_due ON tasks (queue, scheduled_for)
        WHERE status = 'scheduled'""",
    """CREATE INDEX IF NOT EXISTS tasks_lease ON tasks (queue, lease_until)
        WHERE status = 'processing'""",
    "CREATE INDEX IF NOT EXISTS tasks_status ON tasks (queue, status, finished_at)",
    "CREATE INDEX IF NOT EXISTS tasks_seq ON tasks (seq)",
    # The worker registry spans queues: one row per live worker, refreshed by heartbeats.
    """CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, info TEXT, last_seen REAL,
        expires_at REAL, stop_requested INTEGER DEFAULT 0)""",
)
#: Statements that bring a file made by an older version up to SCHEMA_VERSION.
MIGRATIONS = {
    2: ("ALTER TABLE tasks ADD COLUMN steps TEXT", "ALTER TABLE tasks ADD COLUMN worker TEXT")
}


def history(event: str, attempt: str = "attempts", note: str | None = None) -> str:
    """SQL that appends one JSON line to ``history``; arguments are SQL expressions."""
    fields = f"'at', :now, 'event', {event}, 'attempt', {attempt}"
    if note is not None:
        fields += f", 'note', {note}"
    return f"history = COALESCE(history, '') || json_object({fields}) || char(10)"


IS_MINE = "queue = :queue AND id = :id AND status = 'processing' AND token = :token"
SETTLED = "token = NULL, lease_until = NULL, updated_at = :now"
PLACEHOLDERS = ", ".join("?" * len(COLUMNS))
INSERT = f"INSERT OR REPLACE INTO tasks ({', '.join(COLUMNS)}) VALUES ({PLACEHOLDERS})"
# "+status" keeps the planner on the primary key instead of scanning every live task.
LIVE_IDS = """SELECT id FROM tasks WHERE queue = ? AND +status IN ('scheduled', 'pending',
    'processing') AND id IN (SELECT value FROM json_each(?))"""
NEXT_SEQ = "SELECT MAX(seq) FROM tasks WHERE seq BETWEEN 0 AND 9e18"  # skips damaged values
PROMOTE = """UPDATE tasks SET status = 'pending', ready_at = scheduled_for, updated_at = :now
    WHERE rowid IN (SELECT rowid FROM tasks WHERE queue = :queue AND status = 'scheduled'
    AND scheduled_for <= :now LIMIT 1000)"""
EXPIRED = """rowid IN (SELECT rowid FROM tasks WHERE queue = :queue AND status = 'processing'
    AND lease_until < :now LIMIT 1000)"""
REAP_POISON = f"""UPDATE tasks SET status = 'failed', dead_reason = 'poison', {SETTLED},
    finished_at = :now, expiries = COALESCE(expiries, 0) + 1, {history("'dead'", note="'poison'")},
    error = json_object('type', 'PoisonTask', 'message', 'delivered ' || COALESCE(attempts, 0)
        || ' times without an ack (lease expired each time); dead-lettered', 'traceback', NULL)
    WHERE {EXPIRED} AND COALESCE(expiries, 0) + 1 >= :max"""
REAP_CANCELED = f"""UPDATE tasks SET status = 'canceled', finished_at = :now, {SETTLED},
    {history("'canceled'")} WHERE {EXPIRED} AND cancel_requested = 1"""
REAP_RETURN = f"""UPDATE tasks SET status = 'pending', expiries = COALESCE(expiries, 0) + 1,
    {SETTLED}, {history("'lease_expired'")} WHERE {EXPIRED}"""
PICK = """SELECT rowid FROM tasks WHERE queue = ? AND status = 'pending'
    ORDER BY priority DESC, ready_at, seq LIMIT 1"""
CLAIM_ROW = """SELECT id, priority, data, type, max_retries, retry_backoff, process_timeout,
    created_at, attempts, queue_timeout, ready_at, started_at, steps FROM tasks WHERE rowid = ?"""
RAW_TEXT = "SELECT CAST(id AS BLOB), CAST(data AS BLOB) FROM tasks WHERE rowid = ?"
TAKE = f"""UPDATE tasks SET status = 'processing', attempts = :attempt, token = :token,
    lease_until = :lease, started_at = :now, updated_at = :now, worker = :worker,
    {history("'reserved'", ":attempt")} WHERE rowid = :rowid"""
TIME_OUT = f"""UPDATE tasks SET status = 'timeout', finished_at = :now, {SETTLED},
    {history("'timeout'")} WHERE rowid = :rowid"""
MALFORMED = f"""UPDATE tasks SET status = 'failed', dead_reason = 'malformed', finished_at = :now,
    {SETTLED}, {history("'dead'", note="'malformed'")}, error = json_object('type',
    'MalformedTask', 'message', 'stored row cannot be read (id missing or not UTF-8 text)',
    'traceback', NULL) WHERE rowid = :rowid"""
NEXT_DUE = "SELECT MIN(scheduled_for) FROM tasks WHERE queue = ? AND status = 'scheduled'"
NEXT_EXPIRY = "SELECT MIN(lease_until) FROM tasks WHERE queue = ? AND status = 'processing'"
ACK = f"""UPDATE tasks SET status = 'success', result = :result, finished_at = :now,
    progress = 1.0, progress_message = NULL, {SETTLED}, {history("'succeeded'")}
    WHERE {IS_MINE}"""
# A hand-back (give_back 1, no delay) keeps the task's place in line: it was first.
NACK = f"""UPDATE tasks SET status = :status, scheduled_for = :due,
    ready_at = CASE WHEN :give_back = 1 AND :due IS NULL THEN ready_at ELSE :ready END,
    seq = CASE WHEN :give_back = 1 AND :due IS NULL THEN seq ELSE :seq END,
    attempts = attempts - :give_back, error = COALESCE(:error, error), {SETTLED},
    {history(":event")} WHERE {IS_MINE} AND cancel_requested IS NOT 1"""
NACK_CANCELED = f"""UPDATE tasks SET status = 'canceled', finished_at = :now,
    error = COALESCE(:error, error), {SETTLED}, {history("'canceled'")}
    WHERE {IS_MINE} AND cancel_requested = 1"""
FAIL = f"""UPDATE tasks SET status = :status,
    dead_reason = CASE WHEN :status = 'failed' THEN :reason END, error = COALESCE(:error, error),
    finished_at = :now, {SETTLED}, {history(":status", note=":reason")}
    WHERE queue = :queue AND id = :id"""
CHECKPOINT = f"UPDATE tasks SET steps = :steps, updated_at = :now WHERE {IS_MINE}"
HEARTBEAT = """INSERT INTO workers (id, info, last_seen, expires_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET info = excluded.info, last_seen = excluded.last_seen,
    expires_at = excluded.expires_at RETURNING stop_requested"""
EXTEND = f"""UPDATE tasks SET lease_until = CASE WHEN lease_until IS NULL THEN NULL
    ELSE :deadline END, updated_at = :now WHERE {IS_MINE}"""
PROGRESS = f"""UPDATE tasks SET progress = :progress, progress_message = :message,
    updated_at = :now WHERE {IS_MINE}"""
CANCEL = f"""UPDATE tasks SET status = 'canceled', finished_at = :now, {SETTLED},
    {history("'canceled'")} WHERE queue = :queue AND id = :id
    AND status IN ('scheduled', 'pending')"""
CANCEL_RUNNING = f"""UPDATE tasks SET cancel_requested = 1, updated_at = :now,
    {history("'cancel_requested'")} WHERE queue = :queue AND id = :id AND status = 'processing'"""
RETRY = f"""UPDATE tasks SET status = 'pending', ready_at = :now, seq = :seq, attempts = 0,
    expiries = 0, dead_reason = NULL, finished_at = NULL, scheduled_for = NULL,
    cancel_requested = 0, progress = 0.0, progress_message = NULL, {SETTLED},
    {history("'retried'", "0")} WHERE queue = :queue AND id = :id
    AND status IN ('failed', 'timeout', 'canceled')"""
GET = f"SELECT {FIELDS} FROM tasks WHERE queue = ? AND id = ?"
CLAIM_ORDER = "priority DESC, ready_at, seq"
NEWEST = "COALESCE(finished_at, updated_at) DESC, rowid DESC"
LIST_PENDING = f"""SELECT {FIELDS} FROM tasks WHERE queue = ? AND status = 'pending'
    ORDER BY {CLAIM_ORDER} LIMIT ? OFFSET ?"""
LIST_STATUS = f"""SELECT {FIELDS} FROM tasks WHERE queue = ? AND status = ?
    ORDER BY {NEWEST} LIMIT ? OFFSET ?"""
LIST_ALL = f"""SELECT {FIELDS} FROM tasks WHERE queue = ? ORDER BY status = 'pending' DESC,
    CASE WHEN status = 'pending' THEN priority END DESC,
    CASE WHEN status = 'pending' THEN ready_at END, CASE WHEN status = 'pending' THEN seq END,
    {NEWEST} LIMIT ? OFFSET ?"""
COUNTS = "SELECT status, COUNT(*) FROM tasks WHERE queue = ? GROUP BY status"
RECENT = """SELECT COUNT(*) FILTER (WHERE status = 'success'),
    COUNT(*) FILTER (WHERE status = 'failed'),
    AVG(finished_at - started_at) FILTER (WHERE status = 'success' AND started_at IS NOT NULL)
    FROM tasks WHERE queue = ? AND status IN ('success', 'failed') AND finished_at >= ?"""
SIZE = "SELECT COUNT(*) FROM tasks WHERE queue = ? AND status = 'pending'"
PURGE = "DELETE FROM tasks WHERE queue = ?"
PURGE_STATUS = """DELETE FROM tasks WHERE rowid IN (SELECT rowid FROM tasks WHERE queue = ?
    AND status = ? ORDER BY finished_at LIMIT ?)"""
# Failed rows are the dead-letter list: retention never deletes them.
# Pulled tasks (processing, no lease) are consumed: forgotten after result_ttl too.
SWEEP = """DELETE FROM tasks WHERE rowid IN (SELECT rowid FROM tasks WHERE queue = :queue
    AND status IN ('success', 'canceled', 'timeout') AND finished_at < :before LIMIT 10000)
    OR rowid IN (SELECT rowid FROM tasks WHERE queue = :queue AND status = 'processing'
    AND lease_until IS NULL AND started_at < :before LIMIT 10000)"""
