"""The PostgreSQL event log (schema version 2): an ``events`` table and monotonic counters,
written by triggers on ``tasks`` in the transaction of each transition.

Triggers, as on SQLite: every transition appends one JSON line to ``history`` (see
``schema._line``) in the statement that makes it, so a trigger on ``history`` emits the
event of every rule, including rules added later. A row's new lines are the suffix its
history gained (a re-push replaces the history: then every line is new). Progress and
checkpoint change ``progress``/``steps`` without a history line; two more triggers emit
those, and a push's event is read from the new row itself (no JSON).

Order without gaps. ``id`` (bigserial) alone is not a safe reading position: ids are taken
when a row is written, not when its transaction commits, so a reader could pass an id whose
transaction commits later and never see it. Each row also records its transaction
(``tx``, ``pg_current_xact_id()``); readers read in ``(tx, id)`` order and only rows of
transactions older than the oldest still running (``pg_snapshot_xmin``): every such
transaction has ended, so nothing can appear before a reader's position afterwards. The
price: a transaction left open on the server (one that wrote something) delays delivery,
never loses it. A position is the text ``"<tx>-<id>"``.

Counters cost nothing per event (no hot row to update): a queue's count of an event is the
rows the log still holds plus ``event_counters``, into which trimming (:func:`trim`, run by
the store's retention pass) folds the rows it deletes, in the same statement. Trimming keeps
the newest :data:`KEPT` events of a queue and records the last position it deleted in
``event_trims``, so a reader behind it gets an explicit ``reset``. Purging or clearing tasks
leaves the log and the counters alone.
"""

from __future__ import annotations

from typing import Any

from ...lifecycle import Event, TaskStatus

VERSION = 2
#: Events kept per queue (older ones are folded into the counters and deleted).
KEPT = 10_000

_COLUMNS = "tx, queue, task_id, event, status, attempt, progress, at, worker, note"


def _insert(event: str, attempt: str, at: str, note: str) -> str:
    return f"""INSERT INTO {{s}}.events ({_COLUMNS}) VALUES (pg_current_xact_id(), NEW.queue,
        NEW.id, {event}, NEW.status, {attempt}, NEW.progress, {at}, NEW.worker, {note});"""


_FIELD_EVENT = _insert(
    "TG_ARGV[0]", "NEW.attempts", "NEW.updated_at",
    f"CASE WHEN TG_ARGV[0] = '{Event.PROGRESS}' THEN NEW.progress_message END",
)  # fmt: skip
_LINE_EVENT = _insert(
    "_j->>'event'", "coalesce((_j->>'attempt')::integer, NEW.attempts)",
    "coalesce((_j->>'at')::double precision, NEW.updated_at)", "_j->>'note'",
)  # fmt: skip


def statements(schema: str) -> list[str]:
    """The migration's statements for one schema (idempotent: IF NOT EXISTS, OR REPLACE)."""
    t = f"{schema}.tasks"
    texts = [
        """CREATE TABLE IF NOT EXISTS {s}.events (id bigserial PRIMARY KEY, tx xid8 NOT NULL,
            queue text NOT NULL, task_id text, event text NOT NULL, status text,
            attempt integer, progress double precision, at double precision, worker text,
            note text)""",
        "CREATE INDEX IF NOT EXISTS events_queue ON {s}.events (queue, tx, id)",
        """CREATE TABLE IF NOT EXISTS {s}.event_counters (queue text, event text,
            n bigint NOT NULL DEFAULT 0, PRIMARY KEY (queue, event))""",
        """CREATE TABLE IF NOT EXISTS {s}.event_trims (queue text PRIMARY KEY,
            tx xid8 NOT NULL, id bigint NOT NULL)""",
        # A new row: pushed or scheduled (enqueue writes its one history line).
        f"""CREATE OR REPLACE FUNCTION {{s}}.event_pushed() RETURNS trigger
            LANGUAGE plpgsql AS $$
        BEGIN
          {
            _insert(
                f"CASE WHEN NEW.status = '{TaskStatus.SCHEDULED}' THEN '{Event.SCHEDULED}'"
                f" ELSE '{Event.PUSHED}' END",
                "NEW.attempts",
                "NEW.updated_at",
                "NULL",
            )
        }
          RETURN NULL;
        END $$""",
        # The lines a transition appended to the history: one event each.
        f"""CREATE OR REPLACE FUNCTION {{s}}.event_transition() RETURNS trigger
            LANGUAGE plpgsql AS $$
        DECLARE _old text := coalesce(OLD.history, ''); _new text := coalesce(NEW.history, '');
          _line text; _j jsonb;
        BEGIN
          IF starts_with(_new, _old) THEN _new := substr(_new, length(_old) + 1); END IF;
          FOR _line IN SELECT x FROM regexp_split_to_table(_new, E'\\n') AS x LOOP
            CONTINUE WHEN _line = '';
            _j := _line::jsonb;
            {_LINE_EVENT}
          END LOOP;
          RETURN NULL;
        END $$""",
        # Progress or a checkpoint (TG_ARGV[0]): no history line, the row holds the value.
        f"""CREATE OR REPLACE FUNCTION {{s}}.event_field() RETURNS trigger
            LANGUAGE plpgsql AS $$
        BEGIN
          {_FIELD_EVENT}
          RETURN NULL;
        END $$""",
        "DROP TRIGGER IF EXISTS tasks_event_pushed ON {t}",
        """CREATE TRIGGER tasks_event_pushed AFTER INSERT ON {t} FOR EACH ROW
            WHEN (coalesce(NEW.history, '') <> '') EXECUTE FUNCTION {s}.event_pushed()""",
        "DROP TRIGGER IF EXISTS tasks_event_transition ON {t}",
        """CREATE TRIGGER tasks_event_transition AFTER UPDATE OF history ON {t} FOR EACH ROW
            WHEN (NEW.history IS DISTINCT FROM OLD.history)
            EXECUTE FUNCTION {s}.event_transition()""",
        "DROP TRIGGER IF EXISTS tasks_event_progress ON {t}",
        f"""CREATE TRIGGER tasks_event_progress AFTER UPDATE OF progress, progress_message
            ON {{t}} FOR EACH ROW WHEN (NEW.history IS NOT DISTINCT FROM OLD.history)
            EXECUTE FUNCTION {{s}}.event_field('{Event.PROGRESS}')""",
        "DROP TRIGGER IF EXISTS tasks_event_checkpoint ON {t}",
        f"""CREATE TRIGGER tasks_event_checkpoint AFTER UPDATE OF steps ON {{t}} FOR EACH ROW
            WHEN (NEW.history IS NOT DISTINCT FROM OLD.history)
            EXECUTE FUNCTION {{s}}.event_field('{Event.CHECKPOINT}')""",
    ]
    return [text.replace("{s}", schema).replace("{t}", t) for text in texts]


# -- trimming (the store's retention pass) ----------------------------------------------------


def trim_sql(schema: str) -> str:
    """Fold the queue's events beyond the newest ``%(kept)s`` into its counters, delete
    them, and note the last position deleted (a reader behind it gets a ``reset``): one
    statement, one transaction. Two passes at once delete each row once (the second finds
    it gone), so nothing is counted twice."""
    s = schema
    return f"""WITH cut AS (SELECT tx, id FROM {s}.events WHERE queue = %(q)s
        ORDER BY tx DESC, id DESC OFFSET %(kept)s LIMIT 1),
    gone AS (DELETE FROM {s}.events e USING cut WHERE e.queue = %(q)s
        AND (e.tx, e.id) <= (cut.tx, cut.id) RETURNING e.event),
    folded AS (INSERT INTO {s}.event_counters AS c (queue, event, n)
        SELECT %(q)s, event, count(*) FROM gone GROUP BY event
        ON CONFLICT (queue, event) DO UPDATE SET n = c.n + excluded.n RETURNING 1)
    INSERT INTO {s}.event_trims AS w (queue, tx, id) SELECT %(q)s, tx, id FROM cut
    ON CONFLICT (queue) DO UPDATE SET tx = excluded.tx, id = excluded.id
        WHERE (excluded.tx, excluded.id) > (w.tx, w.id)
    RETURNING w.queue"""


def trim(database: Any, queue: str, kept: int = KEPT) -> None:
    """Trim one queue's log to its newest ``kept`` events (see :func:`trim_sql`)."""
    database.reads(trim_sql(database.schema), {"q": queue, "kept": int(kept)})


# -- reading ----------------------------------------------------------------------------------

_XMIN = "pg_snapshot_xmin(pg_current_snapshot())"


def after_sql(schema: str) -> str:
    """The queue's last trimmed position (NULL: none), and up to %(n)s events after
    position (%(tx)s, %(id)s) of ended transactions only (see the module's docstring), in
    one snapshot: one round trip per poll. The first row always comes (the trim position);
    its event columns are NULL when no event follows."""
    s = schema
    return f"""SELECT w.tx::text || '-' || w.id, e.* FROM (SELECT 1) one
        LEFT JOIN {s}.event_trims w ON w.queue = %(q)s
        LEFT JOIN LATERAL (SELECT tx, id, queue, task_id, event, status, attempt, progress,
            at, worker, note FROM {s}.events WHERE queue = %(q)s
            AND (tx, id) > (%(tx)s::xid8, %(id)s) AND tx < {_XMIN}
            ORDER BY tx, id LIMIT %(n)s) e ON true ORDER BY e.tx, e.id"""


def newest_sql(schema: str) -> str:
    """The queue's newest readable position and its last trimmed one (either may be NULL)."""
    s = schema
    return f"""SELECT (SELECT tx::text || '-' || id FROM {s}.events WHERE queue = %(q)s
        AND tx < {_XMIN} ORDER BY tx DESC, id DESC LIMIT 1),
        (SELECT tx::text || '-' || id FROM {s}.event_trims WHERE queue = %(q)s)"""


def counters_sql(schema: str) -> str:
    s = schema
    return f"""SELECT event, sum(n)::bigint FROM (SELECT event, n FROM {s}.event_counters
        WHERE queue = %(q)s UNION ALL SELECT event, count(*) FROM {s}.events
        WHERE queue = %(q)s GROUP BY event) c GROUP BY event"""
