"""One queue's transitions on SQLite: each call is one ``BEGIN IMMEDIATE`` transaction.

The queue order lives in a partial index over pending rows, ``(queue, priority DESC,
ready_at, seq)``, so a claim is one index seek however many tasks wait. ``ready_at`` is when
the task became ready (push, due or re-queue time, read inside the write lock so it never
goes backwards between transactions); ``seq`` keeps FIFO for equal times.

A row that cannot be read into a task (id not text, text that is not UTF-8, numbers that
are not numbers) is dead-lettered inside the claim with ``dead_reason`` ``malformed``.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ...lifecycle import Event, Op, TaskStatus, fail_event
from ..base import (
    UNCLAIMED_DROP,
    UNCLAIMED_MISSING,
    Claimed,
    ClaimResult,
    ClaimSpec,
    Enqueued,
    Head,
    LeaseState,
    NewTask,
    Outcome,
    Preempt,
    QueueStore,
    Settled,
    StoreConfig,
    Ticket,
)
from . import events_sql, keylimits, sql
from .connection import Database

_MAX_SKIPS = 500  # timed-out or malformed rows skipped per claim before yielding
_POLL_SECONDS = 0.005  # how often wait() looks at PRAGMA data_version
_RETENTION_CLAIMS, _RETENTION_SECONDS = 1000, 60.0


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _priority(value: Any) -> int:
    """The AMQP priority of a stored priority (damaged values publish as 0)."""
    try:
        return max(0, min(int(value), 255))
    except (TypeError, ValueError):
        return 0


def _damage(row: sqlite3.Row) -> str | None:
    """What is wrong with a row's numbers, or None when a transition can trust them."""
    if isinstance(row["priority"], bool) or not isinstance(row["priority"], int):
        return "priority is not an integer"
    for field in ("attempts", "expiries", "ticket"):
        if row[field] is not None and (
            isinstance(row[field], bool) or not isinstance(row[field], int)
        ):
            return f"{field} is not a number"
    if not isinstance(row["id"], str):
        return "id is not text"
    return None


class SqliteStore(QueueStore):
    """The transitions of one queue in a server's SQLite file."""

    def __init__(self, database: Database, queue_name: str, config: StoreConfig) -> None:
        self.queue_name = queue_name
        self._database = database
        self._config = config
        self._broker = config.broker_leases
        self._claims, self._retained = 0, float("-inf")
        self._seen_version = database.data_version()
        self._seen_pushes = database.push_count()
        self._pick = self._claim_order(config.aging_interval)

    def _claim_order(self, aging_interval: float | None) -> str:
        """The statement that finds the head of the line: priority first, or (aging on)
        the static aged score, with its index created once."""
        if aging_interval is None:
            return sql.PICK
        with self._database.write():
            self._db().execute(sql.aged_index(aging_interval))
        return sql.pick(sql.aged_order(aging_interval))

    def _db(self) -> sqlite3.Connection:
        return self._database.db()

    def _cursor(self) -> sqlite3.Cursor:
        cursor = self._db().cursor()
        cursor.row_factory = sqlite3.Row
        return cursor

    # -- producing --------------------------------------------------------------------------

    def enqueue(self, tasks: Sequence[NewTask]) -> Enqueued:
        stored: list[bool] = []
        tickets: list[Ticket] = []
        if not tasks:
            return Enqueued(stored, tickets)
        self._maybe_retain()  # also trims the event log when nothing claims
        with self._database.write() as now:
            self._begin(now)
            db = self._db()
            ids = json.dumps([task.task_id for task in tasks])
            old = {
                row[0]: (row[1], row[2]) for row in db.execute(sql.OLD_ROWS, (self.queue_name, ids))
            }
            seq, rows = self._database.next_seq(), list[tuple[Any, ...]]()
            for task in tasks:
                status, ticket = old.get(task.task_id, (None, 0))
                stored.append(status is None if task.unique else status not in sql_live())
                if not stored[-1]:
                    continue
                old[task.task_id] = (TaskStatus.PENDING.value, 0)  # a second copy is a duplicate
                number = _int(ticket) + (1 if self._broker else 0)
                rows.append(self._new_row(task, now, seq + len(rows), number))
                if task.delay <= 0:
                    tickets.append(Ticket(task.task_id, number, task.priority))
            db.executemany(sql.INSERT, rows)
        if any(task.delay <= 0 for task in tasks):
            self._database.notify_push()
        return Enqueued(stored, tickets if self._broker else [])

    def _new_row(self, task: NewTask, now: float, seq: int, ticket: int) -> tuple[Any, ...]:
        delayed = task.delay > 0
        ready = now + task.delay if delayed else now
        event = {"at": now, "event": Event.SCHEDULED if delayed else Event.PUSHED, "attempt": 0}
        expire_at = None if task.queue_timeout is None else ready + task.queue_timeout
        publish_by = now + self._config.publish_grace if self._broker and not delayed else None
        # The order of sql.COLUMNS: ROW_FIELDS but sql.KEYED, sql.EXTRA, then sql.KEYED.
        return (
            task.task_id, self.queue_name, task.type, task.priority, task.data_json,
            TaskStatus.SCHEDULED if delayed else TaskStatus.PENDING, 0, 0, task.max_retries,
            task.retry_backoff, task.queue_timeout, task.process_timeout, now,
            ready if delayed else None, None, None, now, 0.0, None, None, None, None, 0,
            json.dumps(event, separators=(",", ":")) + "\n", None, None, expire_at,
            None, None, None if delayed else now, seq, ticket, publish_by, None,
            task.concurrency_key, task.max_concurrency, 0,
        )  # fmt: skip

    # -- claiming ---------------------------------------------------------------------------

    def claim(self, spec: ClaimSpec) -> ClaimResult:
        self._maybe_retain()  # first: if it fails, nothing has been claimed yet
        self._seen_pushes = self._database.push_count()
        with self._database.write() as now:
            # Read inside the write lock: any later commit by another process changes it.
            self._seen_version = int(self._db().execute("PRAGMA data_version").fetchone()[0])
            return self._claim(now, spec)

    def _claim(self, now: float, spec: ClaimSpec) -> ClaimResult:
        if spec.ticket is not None:
            return self._claim_ticket(now, spec)
        self._upkeep(now, spec.max_deliveries)
        claimed: list[Claimed] = []
        for _ in range(_MAX_SKIPS):
            if len(claimed) >= max(1, spec.count):
                break
            row = self._db().execute(self._pick, (self.queue_name,)).fetchone()
            if row is None:
                break
            cursor = self._cursor()
            full = cursor.execute(sql.CLAIM_ROW, (row[0],)).fetchone()
            below = spec.min_priority is not None and _damage(full) is None
            if below and full["priority"] < spec.min_priority:
                break
            taken = self._take(cursor, row[0], full, now, spec=spec)
            if taken is not None:
                claimed.append(taken)
        else:
            return ClaimResult(claimed, 0.0, skipped=True)
        return ClaimResult(claimed, None if claimed else self._wait_hint(now))

    def _begin(self, now: float) -> None:
        """Every transition starts here: due tasks enter the line and expired waiting tasks
        time out first, so whatever it does sees the state a reader already shows, as on
        every backend. In broker mode only ``due`` promotes: each task must be published as
        it becomes pending."""
        params = {"queue": self.queue_name, "now": now}
        if not self._broker:
            self._db().execute(sql.PROMOTE, params)
        self._db().execute(sql.TIME_OUT_EXPIRED, params)

    def _upkeep(self, now: float, max_deliveries: int) -> None:
        """Promote due tasks, reap expired leases, time out expired waiting tasks."""
        db = self._db()
        params = {"queue": self.queue_name, "now": now, "max": max_deliveries}
        self._begin(now)
        if not self._broker:
            for statement in sql.REAP:
                db.execute(statement, params)

    def _take(
        self,
        cursor: sqlite3.Cursor,
        rowid: int,
        row: sqlite3.Row,
        now: float,
        *,
        spec: ClaimSpec,
        event: str | None = None,
    ) -> Claimed | None:
        """Lease one pending row, or retire it (timeout, malformed) and return None."""
        params: dict[str, Any] = {"rowid": rowid, "now": now}
        problem = _damage(row) or self._not_utf8(rowid, row)
        if problem is not None:
            cursor.execute(sql.MALFORMED_ROW, {**params, "what": problem})
            return None
        expire_at = _float(row["expire_at"])
        if expire_at is not None and now > expire_at:
            cursor.execute(sql.TIME_OUT_ROW, params)
            return None
        if spec.ticket is None and not keylimits.admit(
            self._db(), self.queue_name, rowid, row, now
        ):
            return None  # its concurrency key is full: parked, the claim goes on
        attempt = (row["attempts"] or 0) + 1
        token = uuid.uuid4().hex
        lease = None if spec.lease is None else now + spec.lease
        if event is None:
            event = Event.STARTED if spec.lease is not None else Event.PULLED
        cursor.execute(sql.TAKE, {
            **params, "attempt": attempt, "token": token, "lease": lease,
            "worker": spec.consumer, "event": event,
            "copy": spec.ticket.copy if spec.ticket else None,
        })  # fmt: skip
        return Claimed(
            task_id=row["id"], token=token, attempts=attempt, priority=row["priority"],
            data_json=row["data"], type=None if row["type"] is None else str(row["type"]),
            max_retries=row["max_retries"], retry_backoff=row["retry_backoff"],
            process_timeout=row["process_timeout"], created_at=row["created_at"],
            steps_json=row["steps"],
        )  # fmt: skip

    def _not_utf8(self, rowid: int, row: sqlite3.Row) -> str | None:
        """Reads replace bad bytes with U+FFFD; only then check the stored bytes themselves."""
        data = row["data"]
        if "\ufffd" not in row["id"] and not (isinstance(data, str) and "\ufffd" in data):
            return None
        try:
            for raw in self._db().execute(sql.RAW_TEXT, (rowid,)).fetchone():
                if isinstance(raw, bytes):
                    raw.decode("utf-8")
        except UnicodeDecodeError:
            return "id or data is not UTF-8 text"
        return None

    def _claim_ticket(self, now: float, spec: ClaimSpec) -> ClaimResult:
        """Claim the task a delivered message names (broker mode); see base.TicketClaim."""
        ticket = spec.ticket
        assert ticket is not None
        found = self._db().execute(sql.TICKET_ROW, (self.queue_name, ticket.task_id)).fetchone()
        if found is None:
            return ClaimResult([], unclaimed=UNCLAIMED_MISSING)
        rowid = found[0]
        cursor = self._cursor()
        row = cursor.execute(sql.CLAIM_ROW, (rowid,)).fetchone()
        drop = ClaimResult([], unclaimed=UNCLAIMED_DROP)
        problem = _damage(row) or self._not_utf8(rowid, row)
        if problem is not None:  # a damaged ticket matches no message: it would wait forever
            if row["status"] in sql_live():
                cursor.execute(sql.MALFORMED_ROW, {"rowid": rowid, "now": now, "what": problem})
            return drop
        if _int(row["ticket"]) != ticket.number:
            return drop
        event: str | None = None
        if row["status"] == TaskStatus.PROCESSING:
            # Only the copy it was claimed with, redelivered, means its holder's link died.
            if not ticket.redelivered or row["copy"] != ticket.copy or row["lease_until"] is None:
                return drop
            params = {"rowid": rowid, "now": now, "max": spec.max_deliveries}
            for statement in sql.EXPIRE_ONE:
                if cursor.execute(statement, params).rowcount:
                    break
            row = cursor.execute(sql.CLAIM_ROW, (rowid,)).fetchone()
            if row["status"] != TaskStatus.PENDING:
                return drop
            event = Event.REDELIVERED
        elif row["status"] != TaskStatus.PENDING:
            return drop
        taken = self._take(cursor, rowid, row, now, spec=spec, event=event)
        return ClaimResult([taken]) if taken is not None else drop

    def _wait_hint(self, now: float) -> float | None:
        db = self._db()
        queries = (sql.NEXT_DUE, sql.NEXT_TIMEOUT) if self._broker else (
            sql.NEXT_DUE, sql.NEXT_EXPIRY, sql.NEXT_TIMEOUT)  # fmt: skip
        times = [_float(db.execute(query, (self.queue_name,)).fetchone()[0]) for query in queries]
        known = [t for t in times if t is not None]
        return max(0.0, min(known) - now) if known else None

    # -- settling ---------------------------------------------------------------------------

    def settle(
        self, outcomes: Sequence[Outcome], then: ClaimSpec | None = None
    ) -> tuple[list[Settled], ClaimResult | None]:
        if then is not None:
            self._maybe_retain()
            self._seen_pushes = self._database.push_count()
        woke = False
        with self._database.write() as now:
            self._begin(now)
            settled = [self._settle_one(now, outcome) for outcome in outcomes]
            woke = any(item.status == TaskStatus.PENDING for item in settled)
            claimed = None
            if then is not None:
                self._seen_version = int(self._db().execute("PRAGMA data_version").fetchone()[0])
                claimed = self._claim(now, then)
        if woke:
            self._database.notify_push()
        return settled, claimed

    def _settle_one(self, now: float, outcome: Outcome) -> Settled:
        db = self._db()
        base = {"queue": self.queue_name, "id": outcome.task_id, "now": now,
                "token": outcome.token}  # fmt: skip
        op = outcome.op
        if op is Op.ACK:
            done = db.execute(sql.ACK, {**base, "result": outcome.payload}).rowcount
            return Settled(TaskStatus.SUCCESS.value if done else None)
        if op in (Op.NACK, Op.HAND_BACK):
            return self._give_back(now, outcome, base)
        if op is Op.FAIL:
            statement = sql.FAIL if outcome.token is None else sql.FAIL_HELD
            event = fail_event(outcome.status, outcome.reason)
            done = db.execute(statement, {
                **base, "status": outcome.status.value, "reason": outcome.reason,
                "error": outcome.payload, "event": event,
            }).rowcount  # fmt: skip
            return Settled(outcome.status.value if done else None)
        if op is Op.CHECKPOINT:
            done = db.execute(sql.CHECKPOINT, {**base, "steps": outcome.payload}).rowcount
            return Settled(TaskStatus.PROCESSING.value if done else None)
        if op is Op.PROGRESS:
            done = db.execute(sql.PROGRESS, {
                **base, "progress": outcome.fraction, "message": outcome.payload,
            }).rowcount  # fmt: skip
            return Settled(TaskStatus.PROCESSING.value if done else None)
        raise ValueError(f"settle: {op} is not an outcome")

    def _give_back(self, now: float, outcome: Outcome, base: dict[str, Any]) -> Settled:
        db = self._db()
        error = {"error": outcome.payload}
        if db.execute(sql.NACK_CANCELED, {**base, **error}).rowcount:
            return Settled(TaskStatus.CANCELED.value)
        counted = outcome.op is Op.NACK
        later = outcome.delay > 0
        event = Event.RETRYING if counted else Event.INTERRUPTED
        grace = now + self._config.publish_grace if self._broker else None
        row = db.execute(sql.NACK, {
            **base, **error, "event": event,
            "status": TaskStatus.SCHEDULED if later else TaskStatus.PENDING,
            "due": now + outcome.delay if later else None, "ready": None if later else now,
            "seq": self._database.next_seq(), "give_back": 0 if counted else 1,
            "bump": 1 if self._broker else 0, "publish_by": grace,
        }).fetchone()  # fmt: skip
        if row is None:
            return Settled(None)
        if later:
            return Settled(TaskStatus.SCHEDULED.value)
        new_place = counted and self._broker
        ticket = Ticket(outcome.task_id, _int(row[0]), _priority(row[1])) if new_place else None
        return Settled(TaskStatus.PENDING.value, ticket)

    # -- preemption -------------------------------------------------------------------------

    def head(self) -> Head | None:
        with self._database.errors():
            db = self._db()
            found = db.execute(self._pick, (self.queue_name,)).fetchone()
            row = None if found is None else db.execute(sql.HEAD_ROW, (found[0],)).fetchone()
        if row is None or not isinstance(row[1], int) or not isinstance(row[0], str):
            return None  # nothing ready, or a damaged head a claim will dead-letter
        return Head(row[0], row[1], _float(row[2]) or 0.0)

    def preempt(self, yielded: Preempt, spec: ClaimSpec) -> tuple[Settled, ClaimResult]:
        refused = (Settled(None), ClaimResult([]))
        with self._database.write() as now:
            self._begin(now)
            db = self._db()
            mine = {"queue": self.queue_name, "id": yielded.task_id, "token": yielded.token}
            state = db.execute(sql.PREEMPT_STATE, mine).fetchone()
            if state is None or state[0] == 1 or state[1] >= yielded.max_preemptions:
                return refused  # not held, a cancel was asked, or preempted enough
            urgent = self._urgent(now, spec, yielded.min_priority)
            if urgent is None:
                return refused  # no ready task urgent enough: another worker took it
            rowid, row = urgent
            db.execute(sql.PREEMPT_YIELD, {
                **mine, "now": now, "steps": yielded.steps_json,
                "note": f"preempted by {row['id']}",
            })  # fmt: skip
            # (per-key limits: the key_slot_freed trigger freed the yielded task's slot)
            taken = self._take(self._cursor(), rowid, row, now, spec=spec)
        self._database.notify_push()
        return Settled(TaskStatus.PENDING.value), ClaimResult([] if taken is None else [taken])

    def _urgent(
        self, now: float, spec: ClaimSpec, min_priority: int
    ) -> tuple[int, sqlite3.Row] | None:
        """The id of the task a preemption would claim, if it is ready, readable, not timed
        out and at least ``min_priority``; else None (nothing is changed)."""
        db = self._db()
        if spec.ticket is not None:
            found = db.execute(sql.TICKET_ROW, (self.queue_name, spec.ticket.task_id)).fetchone()
        else:
            found = db.execute(self._pick, (self.queue_name,)).fetchone()
        if found is None:
            return None
        row = self._cursor().execute(sql.CLAIM_ROW, (found[0],)).fetchone()
        expire_at = _float(row["expire_at"])
        if _damage(row) is not None or row["status"] != TaskStatus.PENDING:
            return None
        if spec.ticket is not None and _int(row["ticket"]) != spec.ticket.number:
            return None
        if (expire_at is not None and now > expire_at) or row["priority"] < min_priority:
            return None
        if not keylimits.has_room(db, self.queue_name, row):
            return None  # its concurrency key is full: yielding would start nothing
        return int(found[0]), row

    def renew(self, leases: Sequence[tuple[str, str]], seconds: float | None) -> list[LeaseState]:
        if not leases:
            return []
        ids = json.dumps([task_id for task_id, _ in leases])
        if seconds is None:
            with self._database.errors():
                rows = self._db().execute(sql.HELD, (self.queue_name, ids)).fetchall()
            return _lease_states(leases, rows)
        with self._database.write() as now:
            db = self._db()
            for task_id, token in leases:
                db.execute(sql.EXTEND, {"queue": self.queue_name, "id": task_id, "token": token,
                                        "now": now, "deadline": now + seconds})  # fmt: skip
            rows = db.execute(sql.HELD, (self.queue_name, ids)).fetchall()
        return _lease_states(leases, rows)

    # -- cancel, re-drive, broker tickets -----------------------------------------------------

    def cancel(self, task_id: str) -> bool:
        with self._database.write() as now:
            self._begin(now)
            params = {"queue": self.queue_name, "id": task_id, "now": now}
            db = self._db()
            return bool(
                db.execute(sql.CANCEL, params).rowcount
                or db.execute(sql.CANCEL_RUNNING, params).rowcount
            )

    def retry(self, task_id: str) -> Ticket | None:
        with self._database.write() as now:
            self._begin(now)
            row = self._db().execute(sql.REDRIVE, {
                "queue": self.queue_name, "id": task_id, "now": now,
                "seq": self._database.next_seq(), "bump": 1 if self._broker else 0,
                "publish_by": now + self._config.publish_grace if self._broker else None,
            }).fetchone()  # fmt: skip
        if row is None:
            return None
        self._database.notify_push()
        return Ticket(task_id, _int(row[0]), _priority(row[1]))

    def due(self, limit: int) -> tuple[list[Ticket], float | None]:
        found: list[Ticket] = []
        with self._database.write() as now:
            db = self._db()
            db.execute(sql.TIME_OUT_EXPIRED, {"queue": self.queue_name, "now": now})
            deadline = now + self._config.publish_grace
            for (rowid,) in db.execute(
                sql.DUE_FOR_BROKER, (self.queue_name, now, limit)
            ).fetchall():
                row = db.execute(
                    sql.PROMOTE_FOR_BROKER, {"rowid": rowid, "now": now, "deadline": deadline}
                ).fetchone()
                found.append(Ticket(str(row[0]), _int(row[1]), _priority(row[2])))
            for (rowid,) in db.execute(sql.LATE, (self.queue_name, now, limit)).fetchall():
                row = db.execute(
                    sql.REPUBLISH, {"rowid": rowid, "now": now, "deadline": deadline}
                ).fetchone()
                if row is None:  # claimed, canceled or finished meanwhile: nothing to publish
                    db.execute(sql.NOT_PUBLISHING, (rowid,))
                else:
                    found.append(Ticket(str(row[0]), _int(row[1]), _priority(row[2])))
            next_due = _float(db.execute(sql.NEXT_DUE, (self.queue_name,)).fetchone()[0])
        return found, None if next_due is None else max(0.0, next_due - time.time())

    def published(self, tickets: Sequence[Ticket]) -> None:
        if not tickets:
            return
        with self._database.write():
            self._db().executemany(
                sql.PUBLISHED, [(self.queue_name, t.task_id, t.number) for t in tickets]
            )

    # -- upkeep and purging -----------------------------------------------------------------

    def sweep(self) -> None:
        with self._database.write() as now:
            self._upkeep(now, self._config.max_deliveries)
            self._db().execute(sql.UNSERVABLE, {"queue": self.queue_name, "now": now})
        self._maybe_retain(force=True)

    def _maybe_retain(self, *, force: bool = False) -> None:
        """Delete old finished rows now and then; failed rows stay as the dead-letter list."""
        self._claims += 1
        stale = time.monotonic() - self._retained >= _RETENTION_SECONDS
        if not force and self._claims < _RETENTION_CLAIMS and not stale:
            return
        if force and not stale:
            return
        self._claims, self._retained = 0, time.monotonic()
        with self._database.write() as now:
            self._db().execute(
                sql.RETENTION, {"queue": self.queue_name, "before": now - self._config.result_ttl}
            )
            events_sql.trim(self._db())

    def purge(self) -> int:
        with self._database.write():
            ready = int(self._db().execute(sql.SIZE, (self.queue_name,)).fetchone()[0])
            self._db().execute(sql.PURGE, (self.queue_name,))
        return ready

    def purge_finished(self, status: str, limit: int) -> int:
        with self._database.write():
            cursor = self._db().execute(sql.PURGE_STATUS, (self.queue_name, status, limit))
        return int(cursor.rowcount)

    def wait(self, timeout: float) -> None:
        """Poll ``PRAGMA data_version`` (cheap: shared memory) every 5 ms; a push made in this
        process wakes it at once through a condition variable, and a stopping worker's
        signal pipe (``interrupt_fd``) within a poll."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if self._database.wait_push(self._seen_pushes, min(_POLL_SECONDS, remaining)):
                    return
                if self._database.data_version() != self._seen_version or self.interrupted():
                    return
        finally:
            self._seen_version = self._database.data_version()
            self._seen_pushes = self._database.push_count()


def sql_live() -> frozenset[str]:
    return frozenset({"scheduled", "pending", "processing"})


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _lease_states(leases: Sequence[tuple[str, str]], rows: list[Any]) -> list[LeaseState]:
    found = {row[0]: row for row in rows}
    states = []
    for task_id, token in leases:
        row = found.get(task_id)
        if row is None or row[1] != token or row[2] != TaskStatus.PROCESSING:
            states.append(LeaseState(False))
        else:
            states.append(LeaseState(True, bool(row[3])))
    return states
