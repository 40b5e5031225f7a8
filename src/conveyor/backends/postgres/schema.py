"""The PostgreSQL schema: tables, and one server-side function per transition.

Every transition is one round trip: a store calls one function (``claim``, ``settle``,
``enqueue``...) and the function applies ``conveyor.lifecycle``'s rules inside the
statement's transaction. The functions mirror the SQLite store's statements (the same
columns, the same order of rules); statuses, events and reasons are formatted in from
``conveyor.lifecycle``, never retyped.

Migrations are numbered: :data:`MIGRATIONS` maps a version to its statements, applied in
order under an advisory lock the first time a process opens the database, and recorded in
``<schema>.migrations``. A later version adds a new entry (``ADD COLUMN``, ``CREATE OR
REPLACE FUNCTION``...); an applied one is never edited.
"""

from __future__ import annotations

from ...lifecycle import DeadReason, Event, TaskStatus
from . import events_sql

S, E, R = TaskStatus, Event, DeadReason

#: The newest schema version this code writes and needs.
SCHEMA_VERSION = events_sql.VERSION  # 2: the event log

#: Columns beyond the row fields: the lease, the place in line, and the broker ticket.
EXTRA = ("token", "lease_until", "ready_at", "seq", "ticket", "publish_by", "copy_id")

LIVE = f"('{S.SCHEDULED}', '{S.PENDING}', '{S.PROCESSING}')"
WAITING = f"('{S.SCHEDULED}', '{S.PENDING}')"
CLAIM_ORDER = "priority DESC, ready_at, seq"
SETTLED = "token = NULL, lease_until = NULL, updated_at = _now"


def aged_index(schema: str, interval: float) -> str:
    """The pending index of the aged claim order for one interval (created when a store
    opens with aging on; one per interval in use; :func:`pick` orders by the same
    expression, so a claim stays one index seek)."""
    name = f"tasks_aged_free_{int(interval * 1000)}"  # "free": parked rows left out
    return f"""CREATE INDEX IF NOT EXISTS {name} ON {schema}.tasks
        (queue, (ready_at - priority * {float(interval)!r}::double precision), seq)
        WHERE status = '{S.PENDING}' AND parked = 0"""


def channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel of a schema: the payload is the queue name."""
    return f"{schema}_wake"


def _tables(s: str) -> list[str]:
    return [
        f"CREATE SEQUENCE IF NOT EXISTS {s}.task_seq",
        # Few constraints beyond the types: the store, not the database, applies the rules.
        f"""CREATE TABLE IF NOT EXISTS {s}.tasks (
            queue text NOT NULL, id text NOT NULL, type text, priority integer NOT NULL,
            data text, status text NOT NULL, attempts integer NOT NULL DEFAULT 0,
            expiries integer NOT NULL DEFAULT 0, max_retries integer,
            retry_backoff text, queue_timeout double precision,
            process_timeout double precision, created_at double precision,
            scheduled_for double precision, started_at double precision,
            finished_at double precision, updated_at double precision,
            progress double precision DEFAULT 0, progress_message text, result text,
            error text, dead_reason text, cancel_requested integer DEFAULT 0,
            history text DEFAULT '', steps text, worker text, expire_at double precision,
            token text, lease_until double precision, ready_at double precision, seq bigint,
            ticket bigint DEFAULT 0, publish_by double precision, copy_id text,
            preemptions integer NOT NULL DEFAULT 0, concurrency_key text,
            max_concurrency integer, parked integer NOT NULL DEFAULT 0,
            PRIMARY KEY (queue, id))""",
        # Parked rows (their concurrency key is full) are out of the line: see _keylimits.
        f"""CREATE INDEX IF NOT EXISTS tasks_ready ON {s}.tasks (queue, {CLAIM_ORDER})
            WHERE status = '{S.PENDING}' AND parked = 0""",
        f"""CREATE INDEX IF NOT EXISTS tasks_keyed ON {s}.tasks (queue, concurrency_key, status)
            WHERE concurrency_key IS NOT NULL""",
        f"""CREATE INDEX IF NOT EXISTS tasks_parked ON {s}.tasks
            (queue, concurrency_key, {CLAIM_ORDER}) WHERE parked = 1""",
        # The schedules registry (conveyor.schedules): every scheduler notes what it runs.
        f"""CREATE TABLE IF NOT EXISTS {s}.schedules (name text, fingerprint text,
            definition text, writer text, seen_at double precision,
            next_run double precision, PRIMARY KEY (name, fingerprint))""",
        f"""CREATE TABLE IF NOT EXISTS {s}.schedule_runs (name text PRIMARY KEY,
            last_tick double precision)""",
        f"""CREATE INDEX IF NOT EXISTS tasks_due ON {s}.tasks (queue, scheduled_for)
            WHERE status = '{S.SCHEDULED}'""",
        f"""CREATE INDEX IF NOT EXISTS tasks_lease ON {s}.tasks (queue, lease_until)
            WHERE status = '{S.PROCESSING}'""",
        f"""CREATE INDEX IF NOT EXISTS tasks_status ON {s}.tasks (queue, status, finished_at)""",
        f"""CREATE INDEX IF NOT EXISTS tasks_expire ON {s}.tasks (queue, expire_at)
            WHERE expire_at IS NOT NULL""",
        f"""CREATE INDEX IF NOT EXISTS tasks_publish ON {s}.tasks (queue, publish_by)
            WHERE publish_by IS NOT NULL""",
        # The registry spans queues: live workers (refreshed by heartbeats), queue names.
        f"""CREATE TABLE IF NOT EXISTS {s}.workers (id text PRIMARY KEY, info text,
            last_seen double precision, expires_at double precision,
            stop_requested integer NOT NULL DEFAULT 0)""",
        f"CREATE TABLE IF NOT EXISTS {s}.queues (name text PRIMARY KEY)",
    ]


def _entry(event: str, attempt: str = "attempts", note: str = "NULL") -> str:
    """SQL for one history line, ``{"at", "event", "attempt"[, "note"]}`` and a newline,
    built inline (a function call here would cost more than the rest of the statement)."""
    return (
        f"""'{{"at":' || _now || ',"event":' || to_json({event}::text)::text"""
        f""" || ',"attempt":' || ({attempt})"""
        f""" || coalesce(',"note":' || to_json({note}::text)::text, '') || '}}' || E'\\n'"""
    )


def _line(event: str, attempt: str = "attempts", note: str = "NULL") -> str:
    """SQL appending one history line (the only place a transition is recorded)."""
    return f"history = coalesce(history, '') || {_entry(event, attempt, note)}"


def _lit(value: str) -> str:
    return f"'{value}'"


def _lease_expiry(rows: str) -> str:
    """The lease-expiry rules for the rows ``rows`` selects, in order: canceled if a cancel
    was asked, poison at ``_max`` expiries, else back in line at the place it had."""
    return f"""
    UPDATE {{t}} SET status = '{S.CANCELED}', finished_at = _now, {SETTLED},
        expiries = expiries + 1, {_line(_lit(E.CANCELED))}
        WHERE {rows} AND cancel_requested = 1;
    UPDATE {{t}} SET status = '{S.FAILED}', dead_reason = '{R.POISON}', {SETTLED},
        finished_at = _now, expiries = expiries + 1,
        {_line(_lit(E.DEAD_LETTERED), note=_lit(R.POISON))},
        error = json_build_object('type', 'PoisonTask', 'message', 'delivered ' || attempts
            || ' times without an ack (the lease ran out each time)', 'traceback', NULL)::text
        WHERE {rows} AND expiries + 1 >= _max;
    UPDATE {{t}} SET status = '{S.PENDING}', expiries = expiries + 1, {SETTLED},
        {_line(_lit(E.LEASE_EXPIRED))} WHERE {rows};
    GET DIAGNOSTICS _n = ROW_COUNT;
    IF _n > 0 THEN PERFORM {{s}}.wake(_q); END IF;"""


_EXPIRED_LEASES = f"""(queue, id) IN (SELECT x.queue, x.id FROM {{t}} x WHERE x.queue = _q
    AND x.status = '{S.PROCESSING}' AND x.lease_until < _now LIMIT 1000
    FOR UPDATE SKIP LOCKED)"""
_ONE_ROW = f"queue = _q AND id = _id AND status = '{S.PROCESSING}'"
_IS_MINE = f"queue = _q AND id = o.id AND status = '{S.PROCESSING}' AND token = o.token"
_TIME_OUT = f"""status = '{S.TIMEOUT}', finished_at = _now, {SETTLED}, expire_at = NULL,
    publish_by = NULL, {_line(_lit(E.TIMEOUT), note="'not started in time'")}"""

_FUNCTIONS = [
    """CREATE OR REPLACE FUNCTION {s}.now_s() RETURNS double precision LANGUAGE sql VOLATILE
    AS $$ SELECT extract(epoch FROM clock_timestamp())::double precision $$""",
    """CREATE OR REPLACE FUNCTION {s}.wake(_q text) RETURNS void LANGUAGE sql
    AS $$ SELECT pg_notify('{channel}', _q) $$""",
    # Every transition starts here: due tasks enter the line and expired waiting tasks time
    # out, so whatever it does sees the state a reader already shows. In broker mode only
    # ``due`` promotes: each task must be published as it becomes pending.
    f"""CREATE OR REPLACE FUNCTION {{s}}.begin_(_q text, _now double precision,
        _broker boolean) RETURNS void LANGUAGE plpgsql AS $$
    DECLARE _n integer;
    BEGIN
      -- Each step first probes its partial index: most calls find nothing to do, and a
      -- probe is much cheaper than an UPDATE that matches no row.
      IF NOT _broker AND EXISTS (SELECT 1 FROM {{t}} WHERE queue = _q
          AND status = '{S.SCHEDULED}' AND scheduled_for <= _now) THEN
        UPDATE {{t}} SET status = '{S.PENDING}', ready_at = scheduled_for, updated_at = _now,
            {_line(_lit(E.DUE))}
        WHERE (queue, id) IN (SELECT x.queue, x.id FROM {{t}} x WHERE x.queue = _q
            AND x.status = '{S.SCHEDULED}' AND x.scheduled_for <= _now LIMIT 1000
            FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS _n = ROW_COUNT;
        IF _n > 0 THEN PERFORM {{s}}.wake(_q); END IF;
      END IF;
      IF EXISTS (SELECT 1 FROM {{t}} WHERE queue = _q AND expire_at IS NOT NULL
          AND expire_at < _now AND status IN {WAITING}) THEN
        UPDATE {{t}} SET {_TIME_OUT}
        WHERE (queue, id) IN (SELECT x.queue, x.id FROM {{t}} x WHERE x.queue = _q
            AND x.expire_at IS NOT NULL AND x.expire_at < _now AND x.status IN {WAITING}
            LIMIT 100 FOR UPDATE SKIP LOCKED);
      END IF;
    END $$""",
    f"""CREATE OR REPLACE FUNCTION {{s}}.reap(_q text, _now double precision, _max integer)
        RETURNS void LANGUAGE plpgsql AS $$
    DECLARE _n integer;
    BEGIN
      IF NOT EXISTS (SELECT 1 FROM {{t}} WHERE queue = _q AND status = '{S.PROCESSING}'
          AND lease_until < _now) THEN
        RETURN;
      END IF;
      {_lease_expiry(_EXPIRED_LEASES)}
    END $$""",
    # Seconds until the earliest delayed task is due, lease expires or wait times out.
    f"""CREATE OR REPLACE FUNCTION {{s}}.hint(_q text, _now double precision,
        _broker boolean) RETURNS double precision LANGUAGE plpgsql STABLE AS $$
    DECLARE _soonest double precision;
    BEGIN
      _soonest := least(
          (SELECT min(scheduled_for) FROM {{t}} WHERE queue = _q
              AND status = '{S.SCHEDULED}'),
          CASE WHEN NOT _broker THEN (SELECT min(lease_until) FROM {{t}} WHERE queue = _q
              AND status = '{S.PROCESSING}') END,
          (SELECT min(expire_at) FROM {{t}} WHERE queue = _q AND expire_at IS NOT NULL));
      RETURN CASE WHEN _soonest IS NOT NULL THEN greatest(0, _soonest - _now) END;
    END $$""",
    # Lease one pending row (already locked by the caller); the claimed task as JSON.
    f"""CREATE OR REPLACE FUNCTION {{s}}.take(_q text, _id text, _now double precision,
        _lease double precision, _consumer text, _event text, _copy text)
        RETURNS jsonb LANGUAGE plpgsql AS $$
    DECLARE _taken jsonb;
    BEGIN
    UPDATE {{t}} SET status = '{S.PROCESSING}', attempts = attempts + 1,
        token = replace(gen_random_uuid()::text, '-', ''), lease_until = _now + _lease,
        started_at = _now, updated_at = _now, worker = _consumer, expire_at = NULL,
        publish_by = NULL, copy_id = _copy, {_line("_event", "attempts + 1")}
    WHERE queue = _q AND id = _id
    RETURNING jsonb_build_object('id', id, 'token', token, 'attempts', attempts,
        'priority', priority, 'data', data, 'type', type, 'max_retries', max_retries,
        'retry_backoff', retry_backoff, 'process_timeout', process_timeout,
        'created_at', created_at, 'steps', steps) INTO _taken;
    RETURN _taken;
    END $$""",
    # The head of the line: priority first, or with aging on (``_aging`` seconds per
    # priority level) the static score ready_at - priority * _aging, which an expression
    # index of the store's own covers (dynamic SQL: the constant must match the index).
    # ``_lock``: FOR UPDATE SKIP LOCKED (a claim); else a plain read (head()).
    f"""CREATE OR REPLACE FUNCTION {{s}}.pick(_q text, _aging double precision,
        _lock boolean, OUT id text, OUT priority integer, OUT expire_at double precision,
        OUT ready_at double precision) LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    BEGIN
      IF _aging IS NULL AND _lock THEN
        SELECT t.id, t.priority, t.expire_at, t.ready_at INTO id, priority, expire_at,
            ready_at FROM {{t}} t WHERE t.queue = _q AND t.status = '{S.PENDING}'
            AND t.parked = 0 ORDER BY {CLAIM_ORDER} LIMIT 1 FOR UPDATE SKIP LOCKED;
      ELSIF _aging IS NULL THEN
        SELECT t.id, t.priority, t.expire_at, t.ready_at INTO id, priority, expire_at,
            ready_at FROM {{t}} t WHERE t.queue = _q AND t.status = '{S.PENDING}'
            AND t.parked = 0 ORDER BY {CLAIM_ORDER} LIMIT 1;
      ELSE
        EXECUTE format('SELECT id, priority, expire_at, ready_at FROM {{t}}
            WHERE queue = $1 AND status = ''{S.PENDING}'' AND parked = 0
            ORDER BY ready_at - priority * %s::double precision, seq LIMIT 1 %s', _aging,
            CASE WHEN _lock THEN 'FOR UPDATE SKIP LOCKED' ELSE '' END)
            INTO id, priority, expire_at, ready_at USING _q;
      END IF;
    END $$""",
    # Yield a running task at a step boundary and claim the urgent one, in one step: the
    # lifecycle's PREEMPT rows, in their order (a cancel asked, no urgent task, maxed).
    f"""CREATE OR REPLACE FUNCTION {{s}}.preempt(_q text, _id text, _token text,
        _steps text, _min_priority integer, _max_preemptions integer, _ticket_id text,
        _ticket_number bigint, _copy text, _lease double precision, _consumer text,
        _broker boolean, _aging double precision) RETURNS jsonb LANGUAGE plpgsql AS $$
    DECLARE
      _now double precision := {{s}}.now_s(); st record; u record;
      _refused jsonb := jsonb_build_object('status', NULL, 'claimed', '[]'::jsonb);
      _event text := CASE WHEN _lease IS NULL THEN '{E.PULLED}' ELSE '{E.STARTED}' END;
    BEGIN
      PERFORM {{s}}.begin_(_q, _now, _broker);
      SELECT cancel_requested, preemptions INTO st FROM {{t}} WHERE queue = _q AND id = _id
          AND status = '{S.PROCESSING}' AND token = _token FOR UPDATE;
      IF NOT FOUND OR st.cancel_requested = 1 OR st.preemptions >= _max_preemptions THEN
        RETURN _refused;  -- not held, a cancel was asked, or preempted enough
      END IF;
      IF _ticket_id IS NOT NULL THEN
        SELECT t.id, t.priority, t.expire_at INTO u FROM {{t}} t WHERE t.queue = _q
            AND t.id = _ticket_id AND t.status = '{S.PENDING}'
            AND t.ticket = _ticket_number FOR UPDATE;
        IF NOT FOUND THEN RETURN _refused; END IF;
      ELSE
        u := {{s}}.pick(_q, _aging, true);
        IF u.id IS NULL THEN RETURN _refused; END IF;
      END IF;
      IF (u.expire_at IS NOT NULL AND _now > u.expire_at) OR u.priority < _min_priority THEN
        RETURN _refused;  -- no ready task urgent enough: another worker took it
      END IF;
      IF NOT {{s}}.admit(_q, u.id, _now, false) THEN
        RETURN _refused;  -- its concurrency key is full: yielding would start nothing
      END IF;
      UPDATE {{t}} SET status = '{S.PENDING}', steps = coalesce(_steps, steps),
          attempts = greatest(attempts - 1, 0), preemptions = preemptions + 1, {SETTLED},
          {_line(_lit(E.PREEMPTED), "greatest(attempts - 1, 0)", "'preempted by ' || u.id")}
      WHERE queue = _q AND id = _id;
      -- PER-KEY LIMITS HOOK: the yielded task has left processing here.
      PERFORM {{s}}.wake(_q);
      RETURN jsonb_build_object('status', '{S.PENDING}', 'claimed', jsonb_build_array(
          {{s}}.take(_q, u.id, _now, _lease, _consumer, _event, _copy)));
    END $$""",
    # Per-key concurrency: may this pending task run now? Its key's limit is the smallest
    # max_concurrency among the key's running tasks and it. A claim (``_park``) parks it
    # when the key is full; when the key keeps room after it, the key's next parked task
    # is re-admitted too (a raised limit, or mixed limits, never strands one). One advisory
    # lock per queue serialises the counts between concurrent keyed claims: a lock per key
    # would deadlock two claims that take several keys in different orders, and only
    # transactions that meet a keyed task ever take it (unkeyed claims never wait on it).
    f"""CREATE OR REPLACE FUNCTION {{s}}.admit(_q text, _id text, _now double precision,
        _park boolean) RETURNS boolean LANGUAGE plpgsql AS $$
    DECLARE k record; c record; _limit integer;
    BEGIN
      SELECT concurrency_key, max_concurrency INTO k FROM {{t}} WHERE queue = _q AND id = _id;
      IF k.concurrency_key IS NULL THEN RETURN true; END IF;
      PERFORM pg_advisory_xact_lock(hashtext(_q), hashtext('conveyor:keys'));
      SELECT count(*) AS running, min(max_concurrency) FILTER (WHERE max_concurrency > 0)
          AS smallest INTO c FROM {{t}} WHERE queue = _q
          AND concurrency_key = k.concurrency_key AND status = '{S.PROCESSING}';
      _limit := least(CASE WHEN k.max_concurrency > 0 THEN k.max_concurrency END, c.smallest);
      IF _limit IS NULL THEN RETURN true; END IF;
      IF c.running >= _limit THEN
        IF _park THEN
          UPDATE {{t}} SET parked = 1, updated_at = _now, {_line(_lit(E.PARKED))}
              WHERE queue = _q AND id = _id;
        END IF;
        RETURN false;
      END IF;
      IF _park AND c.running + 1 < _limit THEN
        PERFORM {{s}}.readmit(_q, k.concurrency_key);
      END IF;
      RETURN true;
    END $$""",
    f"""CREATE OR REPLACE FUNCTION {{s}}.readmit(_q text, _key text) RETURNS void
        LANGUAGE sql AS $$
    UPDATE {{t}} SET parked = 0 WHERE (queue, id) = (SELECT queue, id FROM {{t}}
        WHERE queue = _q AND concurrency_key = _key AND parked = 1
        AND status = '{S.PENDING}' ORDER BY {CLAIM_ORDER} LIMIT 1) $$""",
    # Re-admission is the database's: whenever a keyed task leaves processing (ack, nack,
    # fail, cancel, lease expiry, hand-back, preemption, delete), or an admitted one leaves
    # the line without running, the head of the key's parked tasks is ready again, at the
    # place it had. The running count is never stored, so a slot cannot leak.
    f"""CREATE OR REPLACE FUNCTION {{s}}.key_status_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'DELETE' THEN
        IF OLD.status = '{S.PROCESSING}' THEN
          PERFORM {{s}}.readmit(OLD.queue, OLD.concurrency_key);
        END IF;
        RETURN NULL;
      END IF;
      IF NEW.parked = 1 AND NEW.status <> '{S.PENDING}' THEN
        UPDATE {{t}} SET parked = 0 WHERE queue = NEW.queue AND id = NEW.id;
      END IF;
      IF OLD.status = '{S.PROCESSING}' OR (OLD.status = '{S.PENDING}' AND OLD.parked = 0
          AND NEW.status <> '{S.PROCESSING}') THEN
        PERFORM {{s}}.readmit(OLD.queue, OLD.concurrency_key);
      END IF;
      RETURN NULL;
    END $$""",
    "DROP TRIGGER IF EXISTS key_status_changed ON {t}",
    """CREATE TRIGGER key_status_changed AFTER UPDATE OF status ON {t} FOR EACH ROW
        WHEN (OLD.concurrency_key IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status)
        EXECUTE FUNCTION {s}.key_status_changed()""",
    "DROP TRIGGER IF EXISTS key_slot_deleted ON {t}",
    """CREATE TRIGGER key_slot_deleted AFTER DELETE ON {t} FOR EACH ROW
        WHEN (OLD.concurrency_key IS NOT NULL AND OLD.status = 'processing')
        EXECUTE FUNCTION {s}.key_status_changed()""",
    # ``_begun``: the caller (settle) has just run begin_ in this transaction.
    f"""CREATE OR REPLACE FUNCTION {{s}}.claim_at(_q text, _now double precision,
        _count integer, _lease double precision, _max integer, _consumer text, _min integer,
        _broker boolean, _begun boolean, _aging double precision) RETURNS jsonb
        LANGUAGE plpgsql AS $$
    DECLARE
      _out jsonb := '[]'::jsonb; _got integer := 0; _skips integer := 0; r record;
      _event text := CASE WHEN _lease IS NULL THEN '{E.PULLED}' ELSE '{E.STARTED}' END;
    BEGIN
      IF NOT _begun THEN PERFORM {{s}}.begin_(_q, _now, _broker); END IF;
      IF NOT _broker THEN PERFORM {{s}}.reap(_q, _now, _max); END IF;
      WHILE _got < greatest(_count, 1) LOOP
        r := {{s}}.pick(_q, _aging, true);
        EXIT WHEN r.id IS NULL;
        EXIT WHEN _min IS NOT NULL AND r.priority < _min;
        IF r.expire_at IS NOT NULL AND _now > r.expire_at THEN
          UPDATE {{t}} SET {_TIME_OUT} WHERE queue = _q AND id = r.id;
          _skips := _skips + 1;
          IF _skips >= 500 THEN
            RETURN jsonb_build_object('claimed', _out, 'hint', 0, 'skipped', true);
          END IF;
          CONTINUE;
        END IF;
        IF NOT {{s}}.admit(_q, r.id, _now, true) THEN
          CONTINUE;  -- its concurrency key is full: parked, the claim goes on
        END IF;
        _out := _out || jsonb_build_array(
            {{s}}.take(_q, r.id, _now, _lease, _consumer, _event, NULL));
        _got := _got + 1;
      END LOOP;
      IF _got > 0 THEN RETURN jsonb_build_object('claimed', _out); END IF;
      RETURN jsonb_build_object('claimed', _out, 'hint', {{s}}.hint(_q, _now, _broker));
    END $$""",
    """CREATE OR REPLACE FUNCTION {s}.claim(_q text, _count integer,
        _lease double precision, _max integer, _consumer text, _min integer,
        _broker boolean, _aging double precision) RETURNS jsonb LANGUAGE plpgsql AS $$
    BEGIN
      RETURN {s}.claim_at(_q, {s}.now_s(), _count, _lease, _max, _consumer, _min,
          _broker, false, _aging);
    END $$""",
    # Broker mode: claim exactly the task a delivered message names (see base.TicketClaim).
    f"""CREATE OR REPLACE FUNCTION {{s}}.claim_ticket(_q text, _id text, _number bigint,
        _copy text, _redelivered boolean, _lease double precision, _max integer,
        _consumer text) RETURNS jsonb LANGUAGE plpgsql AS $$
    DECLARE
      _now double precision := {{s}}.now_s(); r record; _n integer;
      _event text := CASE WHEN _lease IS NULL THEN '{E.PULLED}' ELSE '{E.STARTED}' END;
    BEGIN
      SELECT status, ticket, copy_id, lease_until INTO r FROM {{t}}
          WHERE queue = _q AND id = _id FOR UPDATE;
      IF NOT FOUND THEN RETURN jsonb_build_object('unclaimed', 'missing'); END IF;
      IF r.ticket IS DISTINCT FROM _number THEN
        RETURN jsonb_build_object('unclaimed', 'drop');
      END IF;
      IF r.status = '{S.PROCESSING}' THEN
        -- Only the copy it was claimed with, redelivered, means its holder's link died.
        IF NOT _redelivered OR r.copy_id IS DISTINCT FROM _copy OR r.lease_until IS NULL THEN
          RETURN jsonb_build_object('unclaimed', 'drop');
        END IF;
        {_lease_expiry(_ONE_ROW)}
        SELECT status, expire_at INTO r FROM {{t}} WHERE queue = _q AND id = _id;
        IF r.status <> '{S.PENDING}' THEN RETURN jsonb_build_object('unclaimed', 'drop'); END IF;
        _event := '{E.REDELIVERED}';
      ELSIF r.status <> '{S.PENDING}' THEN
        RETURN jsonb_build_object('unclaimed', 'drop');
      END IF;
      SELECT expire_at INTO r FROM {{t}} WHERE queue = _q AND id = _id;
      IF r.expire_at IS NOT NULL AND _now > r.expire_at THEN
        UPDATE {{t}} SET {_TIME_OUT} WHERE queue = _q AND id = _id;
        RETURN jsonb_build_object('unclaimed', 'drop');
      END IF;
      RETURN jsonb_build_object('claimed', jsonb_build_array(
          {{s}}.take(_q, _id, _now, _lease, _consumer, _event, _copy)));
    END $$""",
    f"""CREATE OR REPLACE FUNCTION {{s}}.enqueue(_q text, _ids text[], _types text[],
        _priorities integer[], _datas text[], _delays double precision[],
        _max_retries integer[], _backoffs text[], _queue_timeouts double precision[],
        _process_timeouts double precision[], _broker boolean, _grace double precision,
        _keys text[], _limits integer[], _unique boolean[])
        RETURNS jsonb LANGUAGE plpgsql AS $$
    DECLARE
      _now double precision := {{s}}.now_s(); _out jsonb := '[]'::jsonb; _woke boolean := false;
      _later boolean; _ready double precision; _ticket bigint;
    BEGIN
      PERFORM {{s}}.begin_(_q, _now, _broker);
      FOR i IN 1 .. coalesce(array_length(_ids, 1), 0) LOOP
        _later := _delays[i] > 0;
        _ready := _now + CASE WHEN _later THEN _delays[i] ELSE 0 END;
        INSERT INTO {{t}} AS t (queue, id, type, priority, data, status, attempts, expiries,
            max_retries, retry_backoff, queue_timeout, process_timeout, created_at,
            scheduled_for, updated_at, progress, cancel_requested, history, expire_at,
            ready_at, seq, ticket, publish_by, concurrency_key, max_concurrency, parked)
        VALUES (_q, _ids[i], _types[i], _priorities[i], _datas[i],
            CASE WHEN _later THEN '{S.SCHEDULED}' ELSE '{S.PENDING}' END, 0, 0,
            _max_retries[i], _backoffs[i], _queue_timeouts[i], _process_timeouts[i], _now,
            CASE WHEN _later THEN _ready END, _now, 0, 0,
            {_entry(f"CASE WHEN _later THEN '{E.SCHEDULED}' ELSE '{E.PUSHED}' END", "0")},
            _ready + _queue_timeouts[i], CASE WHEN _later THEN NULL ELSE _now END,
            nextval('{{s}}.task_seq'), CASE WHEN _broker THEN 1 ELSE 0 END,
            CASE WHEN _broker AND NOT _later THEN _now + _grace END, _keys[i], _limits[i], 0)
        ON CONFLICT (queue, id) DO UPDATE SET type = excluded.type,
            priority = excluded.priority, data = excluded.data, status = excluded.status,
            attempts = 0, expiries = 0, max_retries = excluded.max_retries,
            retry_backoff = excluded.retry_backoff, queue_timeout = excluded.queue_timeout,
            process_timeout = excluded.process_timeout, created_at = excluded.created_at,
            scheduled_for = excluded.scheduled_for, started_at = NULL, finished_at = NULL,
            updated_at = excluded.updated_at, progress = 0, progress_message = NULL,
            result = NULL, error = NULL, dead_reason = NULL, cancel_requested = 0,
            history = excluded.history, steps = NULL, worker = NULL,
            expire_at = excluded.expire_at, token = NULL, lease_until = NULL,
            ready_at = excluded.ready_at, seq = excluded.seq,
            ticket = coalesce(t.ticket, 0) + excluded.ticket,
            publish_by = excluded.publish_by, copy_id = NULL, preemptions = 0,
            concurrency_key = excluded.concurrency_key,
            max_concurrency = excluded.max_concurrency, parked = 0
        -- A live id is left alone; one whose wait ran out already reads as timed out.
        -- A unique push (a schedule's tick) is refused while any record of the id exists.
        WHERE NOT _unique[i] AND (t.status NOT IN {LIVE}
            OR (t.status IN {WAITING} AND t.expire_at < _now))
        RETURNING t.ticket INTO _ticket;
        IF FOUND THEN
          _out := _out || jsonb_build_array(jsonb_build_array(true, _ticket));
          _woke := _woke OR NOT _later;
        ELSE
          _out := _out || jsonb_build_array(jsonb_build_array(false, NULL));
        END IF;
      END LOOP;
      IF _woke THEN PERFORM {{s}}.wake(_q); END IF;
      RETURN _out;
    END $$""",
    # Outcomes of held tasks in order, then (``_then``) a claim: one transaction.
    # ``_outcomes`` is a JSON array of {op, id, token, payload, delay, reason, fraction,
    # status, event} objects: one parameter, cheaper to send and parse than nine arrays.
    f"""CREATE OR REPLACE FUNCTION {{s}}.settle(_q text, _outcomes jsonb, _broker boolean,
        _grace double precision, _then boolean, _count integer, _lease double precision,
        _max integer, _consumer text, _min integer, _aging double precision) RETURNS jsonb
        LANGUAGE plpgsql AS $$
    DECLARE
      _now double precision := {{s}}.now_s(); _out jsonb := '[]'::jsonb;
      _woke boolean := false; _n integer; r record; _counted boolean; _later boolean;
      _keep boolean; _back integer; o record;
    BEGIN
      PERFORM {{s}}.begin_(_q, _now, _broker);
      FOR o IN SELECT * FROM jsonb_to_recordset(_outcomes) AS x(op text, id text,
          token text, payload text, delay double precision, reason text,
          fraction double precision, status text, event text) LOOP
        IF o.op = 'ack' THEN
          UPDATE {{t}} SET status = '{S.SUCCESS}', result = o.payload, finished_at = _now,
              progress = 1.0, progress_message = NULL, {SETTLED},
              {_line(_lit(E.SUCCEEDED))} WHERE {_IS_MINE};
          GET DIAGNOSTICS _n = ROW_COUNT;
          _out := _out || jsonb_build_array(jsonb_build_array(
              CASE WHEN _n > 0 THEN '{S.SUCCESS}' END));
        ELSIF o.op IN ('nack', 'hand_back') THEN
          UPDATE {{t}} SET status = '{S.CANCELED}', finished_at = _now,
              error = coalesce(o.payload, error), {SETTLED}, {_line(_lit(E.CANCELED))}
              WHERE {_IS_MINE} AND cancel_requested = 1;
          GET DIAGNOSTICS _n = ROW_COUNT;
          IF _n > 0 THEN
            _out := _out || jsonb_build_array(jsonb_build_array('{S.CANCELED}'));
            CONTINUE;
          END IF;
          _counted := o.op = 'nack';
          _later := o.delay > 0;
          -- A hand-back with no delay keeps its place in line: ready_at and seq unchanged.
          _keep := NOT _counted AND NOT _later;
          _back := CASE WHEN _counted THEN 0 ELSE 1 END;
          UPDATE {{t}} SET
              status = CASE WHEN _later THEN '{S.SCHEDULED}' ELSE '{S.PENDING}' END,
              scheduled_for = CASE WHEN _later THEN _now + o.delay END,
              ready_at = CASE WHEN _keep THEN ready_at WHEN _later THEN NULL ELSE _now END,
              seq = CASE WHEN _keep THEN seq ELSE nextval('{{s}}.task_seq') END,
              ticket = coalesce(ticket, 0)
                  + CASE WHEN NOT _keep AND _broker THEN 1 ELSE 0 END,
              publish_by = CASE WHEN NOT _later AND _counted AND _broker
                  THEN _now + _grace END,
              attempts = greatest(attempts - _back, 0), error = coalesce(o.payload, error),
              {SETTLED}, {_line("o.event", "greatest(attempts - _back, 0)")}
          WHERE {_IS_MINE} AND cancel_requested IS DISTINCT FROM 1
          RETURNING ticket, priority INTO r;
          IF NOT FOUND THEN
            _out := _out || jsonb_build_array(jsonb_build_array(NULL));
          ELSIF _later THEN
            _out := _out || jsonb_build_array(jsonb_build_array('{S.SCHEDULED}'));
          ELSE
            _woke := true;
            _out := _out || jsonb_build_array(jsonb_build_array('{S.PENDING}',
                CASE WHEN _counted AND _broker THEN r.ticket END, r.priority));
          END IF;
        ELSIF o.op = 'fail' THEN
          UPDATE {{t}} SET status = o.status,
              dead_reason = CASE WHEN o.status = '{S.FAILED}' THEN o.reason END,
              error = coalesce(o.payload, error), finished_at = _now, expire_at = NULL,
              publish_by = NULL, {SETTLED}, {_line("o.event", note="o.reason")}
          WHERE queue = _q AND id = o.id AND (o.token IS NULL
              OR (status = '{S.PROCESSING}' AND token = o.token));
          GET DIAGNOSTICS _n = ROW_COUNT;
          _out := _out || jsonb_build_array(jsonb_build_array(
              CASE WHEN _n > 0 THEN o.status END));
        ELSE
          IF o.op = 'checkpoint' THEN
            UPDATE {{t}} SET steps = o.payload, updated_at = _now WHERE {_IS_MINE};
          ELSE
            UPDATE {{t}} SET progress = o.fraction, progress_message = o.payload,
                updated_at = _now WHERE {_IS_MINE};
          END IF;
          GET DIAGNOSTICS _n = ROW_COUNT;
          _out := _out || jsonb_build_array(jsonb_build_array(
              CASE WHEN _n > 0 THEN '{S.PROCESSING}' END));
        END IF;
      END LOOP;
      IF _woke THEN PERFORM {{s}}.wake(_q); END IF;
      IF NOT _then THEN RETURN jsonb_build_object('settled', _out); END IF;
      RETURN jsonb_build_object('settled', _out, 'claim',
          {{s}}.claim_at(_q, _now, _count, _lease, _max, _consumer, _min, _broker, true,
              _aging));
    END $$""",
    f"""CREATE OR REPLACE FUNCTION {{s}}.cancel(_q text, _id text) RETURNS boolean
        LANGUAGE plpgsql AS $$
    DECLARE _now double precision := {{s}}.now_s(); _n integer;
    BEGIN
      PERFORM {{s}}.begin_(_q, _now, false);
      UPDATE {{t}} SET status = '{S.CANCELED}', finished_at = _now, {SETTLED},
          expire_at = NULL, publish_by = NULL, {_line(_lit(E.CANCELED))}
          WHERE queue = _q AND id = _id AND status IN {WAITING};
      GET DIAGNOSTICS _n = ROW_COUNT;
      IF _n > 0 THEN RETURN true; END IF;
      UPDATE {{t}} SET cancel_requested = 1, updated_at = _now,
          {_line(_lit(E.CANCEL_REQUESTED))}
          WHERE queue = _q AND id = _id AND status = '{S.PROCESSING}';
      GET DIAGNOSTICS _n = ROW_COUNT;
      RETURN _n > 0;
    END $$""",
    f"""CREATE OR REPLACE FUNCTION {{s}}.redrive(_q text, _id text, _broker boolean,
        _grace double precision) RETURNS jsonb LANGUAGE plpgsql AS $$
    DECLARE _now double precision := {{s}}.now_s(); r record;
    BEGIN
      PERFORM {{s}}.begin_(_q, _now, _broker);
      UPDATE {{t}} SET status = '{S.PENDING}', ready_at = _now,
          seq = nextval('{{s}}.task_seq'), attempts = 0, expiries = 0, dead_reason = NULL,
          finished_at = NULL, scheduled_for = NULL, cancel_requested = 0, progress = 0.0,
          progress_message = NULL, {SETTLED}, expire_at = _now + queue_timeout,
          ticket = coalesce(ticket, 0) + CASE WHEN _broker THEN 1 ELSE 0 END,
          publish_by = CASE WHEN _broker THEN _now + _grace END,
          {_line(_lit(E.REDRIVEN), "0")}
      WHERE queue = _q AND id = _id
          AND status IN ('{S.FAILED}', '{S.TIMEOUT}', '{S.CANCELED}')
      RETURNING ticket, priority INTO r;
      IF NOT FOUND THEN RETURN NULL; END IF;
      PERFORM {{s}}.wake(_q);
      RETURN jsonb_build_array(r.ticket, r.priority);
    END $$""",
    # Broker mode: promote due tasks (a new ticket each) and hand out again the tickets
    # whose publisher died; the tickets to publish, and seconds to the next due task.
    f"""CREATE OR REPLACE FUNCTION {{s}}.due(_q text, _limit integer,
        _grace double precision) RETURNS jsonb LANGUAGE plpgsql AS $$
    DECLARE
      _now double precision := {{s}}.now_s(); _out jsonb := '[]'::jsonb; r record; p record;
      _next double precision;
    BEGIN
      PERFORM {{s}}.begin_(_q, _now, true);
      FOR r IN SELECT id FROM {{t}} WHERE queue = _q AND status = '{S.SCHEDULED}'
          AND scheduled_for <= _now ORDER BY scheduled_for, seq LIMIT _limit
          FOR UPDATE SKIP LOCKED LOOP
        UPDATE {{t}} SET status = '{S.PENDING}', ready_at = scheduled_for,
            ticket = coalesce(ticket, 0) + 1, publish_by = _now + _grace, updated_at = _now,
            {_line(_lit(E.DUE))}
        WHERE queue = _q AND id = r.id RETURNING ticket, priority INTO p;
        _out := _out || jsonb_build_array(jsonb_build_array(r.id, p.ticket, p.priority));
      END LOOP;
      FOR r IN SELECT id, status FROM {{t}} WHERE queue = _q AND publish_by <= _now
          LIMIT _limit FOR UPDATE SKIP LOCKED LOOP
        IF r.status = '{S.PENDING}' THEN
          UPDATE {{t}} SET publish_by = _now + _grace, {_line(_lit(E.REPUBLISHED))}
              WHERE queue = _q AND id = r.id;
          _out := _out || (SELECT jsonb_build_array(jsonb_build_array(id, ticket, priority))
              FROM {{t}} WHERE queue = _q AND id = r.id);
        ELSE  -- claimed, canceled or finished meanwhile: nothing to publish
          UPDATE {{t}} SET publish_by = NULL WHERE queue = _q AND id = r.id;
        END IF;
      END LOOP;
      SELECT min(scheduled_for) INTO _next FROM {{t}}
          WHERE queue = _q AND status = '{S.SCHEDULED}';
      RETURN jsonb_build_object('tickets', _out, 'next',
          CASE WHEN _next IS NOT NULL THEN greatest(0, _next - _now) END);
    END $$""",
    """CREATE OR REPLACE FUNCTION {s}.sweep(_q text, _max integer, _broker boolean)
        RETURNS void LANGUAGE plpgsql AS $$
    DECLARE _now double precision := {s}.now_s();
    BEGIN
      PERFORM {s}.begin_(_q, _now, _broker);
      IF NOT _broker THEN PERFORM {s}.reap(_q, _now, _max); END IF;
    END $$""",
]


def migrations(schema: str) -> dict[int, list[str]]:
    """The statements of each schema version, for one schema name."""
    table = f"{schema}.tasks"
    functions = [
        text.replace("{s}", schema).replace("{t}", table).replace("{channel}", channel(schema))
        for text in _FUNCTIONS
    ]
    return {1: [*_tables(schema), *functions], events_sql.VERSION: events_sql.statements(schema)}
