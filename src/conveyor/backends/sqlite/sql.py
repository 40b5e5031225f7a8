"""The SQL of the SQLite store: the schema, its migrations, and one statement per transition.

Every status, event and reason comes from ``conveyor.lifecycle`` (the f-strings below), so
the SQL implements the lifecycle table without retyping it. Named parameters (``:queue``,
``:id``, ``:token``, ``:now``...) are bound by the caller. The lease-expiry rules are one
function of a row filter (:func:`lease_expiry`), used both by the reaper (every expired
lease) and by a RabbitMQ takeover (one row).
"""

from __future__ import annotations

from itertools import pairwise

from ...lifecycle import DeadReason, Event, TaskStatus
from ..base import ROW_FIELDS

S, E, R = TaskStatus, Event, DeadReason

SCHEMA_VERSION = 6
#: Columns beyond the row fields: the lease, the place in line, and the broker ticket.
EXTRA = ("token", "lease_until", "ready_at", "seq", "ticket", "publish_by", "copy")
#: Per-key concurrency (version 4, see keylimits.py): written after the columns above.
KEYED = ("concurrency_key", "max_concurrency", "parked")
COLUMNS = (*(f for f in ROW_FIELDS if f not in KEYED), *EXTRA, *KEYED)
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
        steps TEXT, worker TEXT, expire_at REAL, token TEXT, lease_until REAL, ready_at REAL,
        seq INTEGER, ticket INTEGER DEFAULT 0, publish_by REAL, copy TEXT,
        PRIMARY KEY (queue, id))""",
    f"""CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (queue, priority DESC, ready_at, seq)
        WHERE status = '{S.PENDING}'""",
    f"""CREATE INDEX IF NOT EXISTS tasks_due ON tasks (queue, scheduled_for)
        WHERE status = '{S.SCHEDULED}'""",
    f"""CREATE INDEX IF NOT EXISTS tasks_lease ON tasks (queue, lease_until)
        WHERE status = '{S.PROCESSING}'""",
    "CREATE INDEX IF NOT EXISTS tasks_status ON tasks (queue, status, finished_at)",
    "CREATE INDEX IF NOT EXISTS tasks_seq ON tasks (seq)",
    # The worker registry spans queues: one row per live worker, refreshed by heartbeats.
    """CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, info TEXT, last_seen REAL,
        expires_at REAL, stop_requested INTEGER DEFAULT 0)""",
)
#: Created after the migrations, since they index columns older files lack.
LATE_SCHEMA = (
    """CREATE INDEX IF NOT EXISTS tasks_expire ON tasks (queue, expire_at)
        WHERE expire_at IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS tasks_publish ON tasks (queue, publish_by)
        WHERE publish_by IS NOT NULL""",
)
#: Columns each version added: a file made by an older version gets the missing ones.
ADDED_COLUMNS = {
    2: ("steps TEXT", "worker TEXT"),
    3: ("expire_at REAL", "ticket INTEGER DEFAULT 0", "publish_by REAL", "copy TEXT"),
    4: ("concurrency_key TEXT", "max_concurrency INTEGER", "parked INTEGER DEFAULT 0"),
    # Version 5 (preemption): how often a task yielded; a fresh record (INSERT OR REPLACE
    # does not name it) starts at 0.
    5: ("preemptions INTEGER DEFAULT 0",),
}
#: Version 3 times out only never-started tasks (see lifecycle): give them their deadline.
BACKFILL_EXPIRE_AT = f"""UPDATE tasks SET expire_at = CASE WHEN status = '{S.SCHEDULED}'
    THEN scheduled_for ELSE ready_at END + queue_timeout WHERE status IN ('{S.SCHEDULED}',
    '{S.PENDING}') AND queue_timeout IS NOT NULL AND started_at IS NULL"""


def whole(expression: str) -> str:
    """A stored number as an integer whatever was written there (0 for text or a blob)."""
    return f"COALESCE(CAST({expression} AS INTEGER), 0)"


def history(event: str, attempt: str = "attempts", note: str | None = None) -> str:
    """The one place a transition is recorded: SQL that appends one JSON line to
    ``history``, and sets ``event_line`` to it, which the event-log trigger reads
    (``events_sql``). Arguments are SQL expressions (an event name is quoted by the caller).

    The attempt is cast to an integer: a damaged ``attempts`` (a blob, text, 1e999) must not
    make ``json_object`` fail the transition halfway (JSON cannot hold a blob)."""
    fields = f"'at', :now, 'event', {event}, 'attempt', {whole(attempt)}"
    if note is not None:
        fields += f", 'note', {note}"
    line = f"json_object({fields})"
    return f"history = COALESCE(history, '') || {line} || char(10), event_line = {line}"


def q(value: str) -> str:
    """A lifecycle name as a SQL string literal."""
    return f"'{value}'"


IS_MINE = f"queue = :queue AND id = :id AND status = '{S.PROCESSING}' AND token = :token"
SETTLED = "token = NULL, lease_until = NULL, updated_at = :now"
WAITING = f"('{S.SCHEDULED}', '{S.PENDING}')"
LIVE = f"('{S.SCHEDULED}', '{S.PENDING}', '{S.PROCESSING}')"
PLACEHOLDERS = ", ".join("?" * len(COLUMNS))
INSERT = f"INSERT OR REPLACE INTO tasks ({', '.join(COLUMNS)}) VALUES ({PLACEHOLDERS})"
# "+status" keeps the planner on the primary key instead of scanning every live task.
OLD_ROWS = """SELECT id, status, ticket FROM tasks WHERE queue = ?
    AND id IN (SELECT value FROM json_each(?))"""
NEXT_SEQ = "SELECT MAX(seq) FROM tasks WHERE seq BETWEEN 0 AND 9e18"  # skips damaged values

# -- promotion, reaping, timeouts -------------------------------------------------------------
DUE_ROWS = f"""rowid IN (SELECT rowid FROM tasks WHERE queue = :queue AND status = '{S.SCHEDULED}'
    AND scheduled_for <= :now LIMIT 1000)"""
PROMOTE = f"""UPDATE tasks SET status = '{S.PENDING}', ready_at = scheduled_for,
    updated_at = :now, {history(q(E.DUE))} WHERE {DUE_ROWS}"""
EXPIRED_LEASES = f"""rowid IN (SELECT rowid FROM tasks WHERE queue = :queue
    AND status = '{S.PROCESSING}' AND lease_until < :now LIMIT 1000)"""


def lease_expiry(rows: str) -> tuple[str, str, str]:
    """The lease-expiry rules for the rows ``rows`` selects, in order: canceled if a cancel
    was asked, poison at ``:max`` expiries, else back in line at the place it had."""
    canceled = f"""UPDATE tasks SET status = '{S.CANCELED}', finished_at = :now, {SETTLED},
        expiries = COALESCE(expiries, 0) + 1, {history(q(E.CANCELED))}
        WHERE {rows} AND cancel_requested = 1"""
    poison = f"""UPDATE tasks SET status = '{S.FAILED}', dead_reason = '{R.POISON}', {SETTLED},
        finished_at = :now, expiries = COALESCE(expiries, 0) + 1,
        {history(q(E.DEAD_LETTERED), note=q(R.POISON))}, error = json_object('type',
        'PoisonTask', 'message', 'delivered ' || {whole("attempts")} || ' times without an '
        || 'ack (the lease ran out each time)', 'traceback', NULL)
        WHERE {rows} AND COALESCE(expiries, 0) + 1 >= :max"""
    back = f"""UPDATE tasks SET status = '{S.PENDING}', expiries = COALESCE(expiries, 0) + 1,
        {SETTLED}, {history(q(E.LEASE_EXPIRED))} WHERE {rows}"""
    return canceled, poison, back


REAP = lease_expiry(EXPIRED_LEASES)
EXPIRE_ONE = lease_expiry("rowid = :rowid")
TIME_OUT_EXPIRED = f"""UPDATE tasks SET status = '{S.TIMEOUT}', finished_at = :now, {SETTLED},
    expire_at = NULL, publish_by = NULL, {history(q(E.TIMEOUT), note="'not started in time'")}
    WHERE rowid IN (SELECT rowid FROM tasks WHERE queue = :queue AND expire_at < :now
    AND status IN {WAITING} LIMIT 100)"""
TIME_OUT_ROW = f"""UPDATE tasks SET status = '{S.TIMEOUT}', finished_at = :now, {SETTLED},
    expire_at = NULL, publish_by = NULL, {history(q(E.TIMEOUT), note="'not started in time'")}
    WHERE rowid = :rowid"""


def malformed(rows: str, what: str = ":what") -> str:
    """Dead-letter the rows ``rows`` selects as ``malformed``; ``what`` (SQL) says why."""
    return f"""UPDATE tasks SET status = '{S.FAILED}', dead_reason = '{R.MALFORMED}',
    finished_at = :now, {SETTLED}, expire_at = NULL, publish_by = NULL,
    {history(q(E.DEAD_LETTERED), "0", note=q(R.MALFORMED))}, error = json_object('type',
    'MalformedTask', 'message', 'stored record is damaged: ' || {what}, 'traceback', NULL)
    WHERE {rows}"""


MALFORMED_ROW = malformed("rowid = :rowid")


def _unservable() -> str:
    """Rows no claim would ever serve: a status none of the lifecycle's (NULL, a blob, other
    text), or a live row whose id is not text (NULL, a blob) or starts with a byte no UTF-8
    text does: no message or caller can name it. One index range per gap between the known
    names (blobs sort after text), so finding them costs a few seeks however many healthy
    rows there are."""
    names = sorted(status.value for status in S)
    bounds = [f"status < '{names[0]}'"]
    bounds += [f"status > '{low}' AND status < '{high}'" for low, high in pairwise(names)]
    bounds += [f"status > '{names[-1]}'", "status IS NULL"]
    bounds += [f"id IS NULL AND status IN {LIVE}", f"id >= X'' AND status IN {LIVE}"]
    # Text that starts with a byte no UTF-8 text starts with (text compares as bytes).
    bounds += [
        f"id >= CAST(X'80' AS TEXT) AND id < CAST(X'C2' AS TEXT) AND status IN {LIVE}",
        f"id >= CAST(X'F5' AS TEXT) AND id < X'' AND status IN {LIVE}",
    ]
    return " UNION ALL ".join(
        f"SELECT rowid FROM tasks WHERE queue = :queue AND {bound}" for bound in bounds
    )


#: The sweep dead-letters such rows, so none is left waiting for nothing (in broker mode a
#: message names the task by its id: a row whose id is damaged is never claimed).
UNSERVABLE = malformed(
    f"rowid IN (SELECT rowid FROM ({_unservable()}) LIMIT 100)",
    f"CASE WHEN status IN {LIVE} AND (typeof(id) != 'text' OR id >= CAST(X'80' AS TEXT)) "
    "THEN 'id is not UTF-8 text' ELSE 'status is not a known status' END",
)


# -- claiming ---------------------------------------------------------------------------------
CLAIM_ORDER = "priority DESC, ready_at, seq"
# Parked rows (their concurrency key is full) are out of the line: see keylimits.py.
PICK = f"""SELECT rowid FROM tasks WHERE queue = ? AND status = '{S.PENDING}' AND parked = 0
    ORDER BY {CLAIM_ORDER} LIMIT 1"""
CLAIM_ROW = """SELECT id, priority, data, type, max_retries, retry_backoff, process_timeout,
    created_at, attempts, expire_at, steps, expiries, status, ticket, copy, lease_until,
    concurrency_key, max_concurrency FROM tasks WHERE rowid = ?"""
TICKET_ROW = "SELECT rowid FROM tasks WHERE queue = ? AND id = ?"
RAW_TEXT = "SELECT CAST(id AS BLOB), CAST(data AS BLOB) FROM tasks WHERE rowid = ?"
TAKE = f"""UPDATE tasks SET status = '{S.PROCESSING}', attempts = :attempt, token = :token,
    lease_until = :lease, started_at = :now, updated_at = :now, worker = :worker,
    expire_at = NULL, publish_by = NULL, copy = :copy, {history(":event", ":attempt")}
    WHERE rowid = :rowid"""


def aged_order(interval: float) -> str:
    """The claim order with aging on: a static score, ready time minus priority levels
    worth ``interval`` seconds each, FIFO (``seq``) within equal scores. The expression is
    the one :func:`aged_index` indexes, so a claim stays one index seek."""
    return f"ready_at - priority * {float(interval)!r}, seq"


def aged_index(interval: float) -> str:
    """The pending index of the aged order for one interval (created when a store opens
    with aging on; an index per interval in use, dropped by nothing: they are small)."""
    name = f"tasks_aged_free_{int(interval * 1000)}"  # "free": parked rows left out
    return f"""CREATE INDEX IF NOT EXISTS {name} ON tasks (queue, {aged_order(interval)})
        WHERE status = '{S.PENDING}' AND parked = 0"""


def pick(order: str) -> str:
    return f"""SELECT rowid FROM tasks WHERE queue = ? AND status = '{S.PENDING}' AND parked = 0
    ORDER BY {order} LIMIT 1"""


HEAD_ROW = "SELECT id, priority, ready_at FROM tasks WHERE rowid = ?"
NEXT_DUE = f"SELECT MIN(scheduled_for) FROM tasks WHERE queue = ? AND status = '{S.SCHEDULED}'"
NEXT_EXPIRY = f"SELECT MIN(lease_until) FROM tasks WHERE queue = ? AND status = '{S.PROCESSING}'"
NEXT_TIMEOUT = "SELECT MIN(expire_at) FROM tasks WHERE queue = ? AND expire_at IS NOT NULL"

# -- settling ---------------------------------------------------------------------------------
ACK = f"""UPDATE tasks SET status = '{S.SUCCESS}', result = :result, finished_at = :now,
    progress = 1.0, progress_message = NULL, {SETTLED}, {history(q(E.SUCCEEDED))}
    WHERE {IS_MINE}"""
NACK_CANCELED = f"""UPDATE tasks SET status = '{S.CANCELED}', finished_at = :now,
    error = COALESCE(:error, error), {SETTLED}, {history(q(E.CANCELED))}
    WHERE {IS_MINE} AND cancel_requested = 1"""
# A hand-back (:give_back 1, no delay) keeps its place in line: ready_at and seq unchanged.
# In broker mode (:bump 1) a new place is a new ticket, to publish within the grace.
NACK = f"""UPDATE tasks SET status = :status, scheduled_for = :due,
    ready_at = CASE WHEN :give_back = 1 AND :due IS NULL THEN ready_at ELSE :ready END,
    seq = CASE WHEN :give_back = 1 AND :due IS NULL THEN seq ELSE :seq END,
    ticket = COALESCE(ticket, 0) + CASE WHEN :give_back = 1 AND :due IS NULL THEN 0
        ELSE :bump END,
    publish_by = CASE WHEN :due IS NULL AND :give_back = 0 THEN :publish_by END,
    attempts = MAX(COALESCE(attempts, 0) - :give_back, 0), error = COALESCE(:error, error),
    {SETTLED}, {history(":event", "MAX(COALESCE(attempts, 0) - :give_back, 0)")}
    WHERE {IS_MINE} AND cancel_requested IS NOT 1 RETURNING ticket, priority"""
# Preemption: the yield keeps the place (ready_at, seq), returns the attempt, stores the
# checkpoint and counts the preemption; the claim of the urgent task follows in the same
# transaction (store.preempt).
PREEMPT_STATE = f"""SELECT cancel_requested, COALESCE(preemptions, 0) FROM tasks
    WHERE {IS_MINE}"""
PREEMPT_YIELD = f"""UPDATE tasks SET status = '{S.PENDING}', steps = COALESCE(:steps, steps),
    attempts = MAX(COALESCE(attempts, 0) - 1, 0), preemptions = COALESCE(preemptions, 0) + 1,
    {SETTLED}, {history(q(E.PREEMPTED), "MAX(COALESCE(attempts, 0) - 1, 0)", ":note")}
    WHERE {IS_MINE}"""
PREEMPTIONS = "SELECT COALESCE(SUM(preemptions), 0) FROM tasks WHERE queue = ?"
WAITING_BY_PRIORITY = f"""SELECT priority, COUNT(*), MIN(ready_at) FROM tasks
    WHERE queue = ? AND status = '{S.PENDING}' GROUP BY priority ORDER BY priority DESC"""
FAIL = f"""UPDATE tasks SET status = :status,
    dead_reason = CASE WHEN :status = '{S.FAILED}' THEN :reason END,
    error = COALESCE(:error, error), finished_at = :now, expire_at = NULL, publish_by = NULL,
    {SETTLED}, {history(":event", note=":reason")} WHERE queue = :queue AND id = :id"""
FAIL_HELD = f"{FAIL} AND status = '{S.PROCESSING}' AND token = :token"
CHECKPOINT = f"UPDATE tasks SET steps = :steps, updated_at = :now WHERE {IS_MINE}"
PROGRESS = f"""UPDATE tasks SET progress = :progress, progress_message = :message,
    updated_at = :now WHERE {IS_MINE}"""
HELD = """SELECT id, token, status, cancel_requested FROM tasks WHERE queue = ?
    AND id IN (SELECT value FROM json_each(?))"""
EXTEND = f"""UPDATE tasks SET lease_until = :deadline, updated_at = :now
    WHERE {IS_MINE} AND lease_until IS NOT NULL"""

# -- cancel and re-drive ----------------------------------------------------------------------
CANCEL = f"""UPDATE tasks SET status = '{S.CANCELED}', finished_at = :now, {SETTLED},
    expire_at = NULL, publish_by = NULL, {history(q(E.CANCELED))}
    WHERE queue = :queue AND id = :id AND status IN {WAITING}"""
CANCEL_RUNNING = f"""UPDATE tasks SET cancel_requested = 1, updated_at = :now,
    {history(q(E.CANCEL_REQUESTED))} WHERE queue = :queue AND id = :id
    AND status = '{S.PROCESSING}'"""
REDRIVE = f"""UPDATE tasks SET status = '{S.PENDING}', ready_at = :now, seq = :seq, attempts = 0,
    expiries = 0, dead_reason = NULL, finished_at = NULL, scheduled_for = NULL,
    cancel_requested = 0, progress = 0.0, progress_message = NULL, {SETTLED},
    expire_at = CASE WHEN queue_timeout IS NOT NULL THEN :now + queue_timeout END,
    ticket = COALESCE(ticket, 0) + :bump, publish_by = :publish_by, {history(q(E.REDRIVEN), "0")}
    WHERE queue = :queue AND id = :id AND status IN ('{S.FAILED}', '{S.TIMEOUT}', '{S.CANCELED}')
    AND CAST(priority AS INTEGER) IS priority RETURNING ticket, priority"""

# -- broker mode: publishing tickets ----------------------------------------------------------
DUE_FOR_BROKER = f"""SELECT rowid FROM tasks WHERE queue = ? AND status = '{S.SCHEDULED}'
    AND scheduled_for <= ? ORDER BY scheduled_for, seq LIMIT ?"""
PROMOTE_FOR_BROKER = f"""UPDATE tasks SET status = '{S.PENDING}', ready_at = scheduled_for,
    ticket = COALESCE(ticket, 0) + 1, publish_by = :deadline, updated_at = :now,
    {history(q(E.DUE))} WHERE rowid = :rowid RETURNING id, ticket, priority"""
LATE = "SELECT rowid FROM tasks WHERE queue = ? AND publish_by <= ? LIMIT ?"
REPUBLISH = f"""UPDATE tasks SET publish_by = :deadline, {history(q(E.REPUBLISHED))}
    WHERE rowid = :rowid AND status = '{S.PENDING}' RETURNING id, ticket, priority"""
NOT_PUBLISHING = "UPDATE tasks SET publish_by = NULL WHERE rowid = ?"
PUBLISHED = "UPDATE tasks SET publish_by = NULL WHERE queue = ? AND id = ? AND ticket = ?"

# -- reading ----------------------------------------------------------------------------------
GET = f"SELECT {FIELDS} FROM tasks WHERE queue = ? AND id = ?"
NEWEST = "COALESCE(finished_at, updated_at) DESC, rowid DESC"
LIST_PENDING = f"""SELECT {FIELDS} FROM tasks WHERE queue = ? AND status = '{S.PENDING}'
    ORDER BY {CLAIM_ORDER} LIMIT ? OFFSET ?"""
LIST_STATUS = f"""SELECT {FIELDS} FROM tasks WHERE queue = ? AND status = ?
    ORDER BY {NEWEST} LIMIT ? OFFSET ?"""
LIST_ALL = f"""SELECT {FIELDS} FROM tasks WHERE queue = ?
    ORDER BY status = '{S.PENDING}' DESC,
    CASE WHEN status = '{S.PENDING}' THEN priority END DESC,
    CASE WHEN status = '{S.PENDING}' THEN ready_at END,
    CASE WHEN status = '{S.PENDING}' THEN seq END, {NEWEST} LIMIT ? OFFSET ?"""
COUNTS = "SELECT status, COUNT(*) FROM tasks WHERE queue = ? GROUP BY status"
RECENT = f"""SELECT COUNT(*) FILTER (WHERE status = '{S.SUCCESS}'),
    COUNT(*) FILTER (WHERE status = '{S.FAILED}'),
    AVG(finished_at - started_at) FILTER (WHERE status = '{S.SUCCESS}'
        AND started_at IS NOT NULL)
    FROM tasks WHERE queue = ? AND status IN ('{S.SUCCESS}', '{S.FAILED}')
    AND finished_at >= ?"""
SIZE = f"SELECT COUNT(*) FROM tasks WHERE queue = ? AND status = '{S.PENDING}'"
PURGE = "DELETE FROM tasks WHERE queue = ?"
PURGE_STATUS = """DELETE FROM tasks WHERE rowid IN (SELECT rowid FROM tasks WHERE queue = ?
    AND status = ? ORDER BY finished_at LIMIT ?)"""
# Failed rows are the dead-letter list: retention never deletes them.
# Pulled tasks (processing, no lease) are consumed: forgotten after result_ttl too.
RETENTION = f"""DELETE FROM tasks WHERE rowid IN (SELECT rowid FROM tasks WHERE queue = :queue
    AND status IN ('{S.SUCCESS}', '{S.CANCELED}', '{S.TIMEOUT}') AND finished_at < :before
    LIMIT 10000) OR rowid IN (SELECT rowid FROM tasks WHERE queue = :queue
    AND status = '{S.PROCESSING}' AND lease_until IS NULL AND started_at < :before
    LIMIT 10000)"""
HEARTBEAT = """INSERT INTO workers (id, info, last_seen, expires_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET info = excluded.info, last_seen = excluded.last_seen,
    expires_at = excluded.expires_at RETURNING stop_requested"""
