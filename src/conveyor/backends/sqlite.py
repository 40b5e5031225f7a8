"""SQLite backend: one WAL-mode file shared by every worker process on one host.

Every change is a single ``BEGIN IMMEDIATE`` transaction, so two processes can never both
claim a task and a crash mid-change leaves the previous state. The queue order lives in a
partial index over pending rows, ``(queue, priority DESC, ready_at, seq)``, so a claim is
one index seek however many tasks wait. ``ready_at`` is when the task became ready (push,
due or re-queue time, read inside the write lock so it never goes backwards between
transactions); ``seq`` is a database-wide counter that keeps FIFO for equal times.

Decisions the contract leaves open:

* ``queue_timeout`` counts from ``ready_at`` and only while the task has not started since it
  became ready: a task returned by an expired lease keeps its place but is not timed out.
* ``extend`` of an at-most-once task (``pull``, no lease) succeeds and leaves it unleased.
* A row that cannot be read into a :class:`Claimed` (id NULL or not text, text that is not
  UTF-8) is dead-lettered inside the claim with ``dead_reason`` ``malformed``.
* ``list(None)`` returns pending rows first in claim order, then the rest newest first.
* The backend's own dead-letters (poison, unreadable row) log the history event ``dead``
  with the reason as note; ``fail`` logs ``failed``. Retention deletes success, canceled and
  timeout rows older than ``result_ttl``; failed rows stay until purged.
* WAL does not work on network filesystems: keep the file on a local disk.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from ..errors import BackendError, BrokerUnavailableError, ConfigError, ConveyorError
from ..models import TaskStatus
from . import sqlite_sql as sql
from .base import ROW_FIELDS, Backend, Claimed, ClaimResult, NewTask

_SYNC_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_POLL_SECONDS = 0.005  # how often wait() looks at PRAGMA data_version
_MAX_SKIPS = 500  # timed-out or malformed rows skipped per claim before yielding
_SWEEP_CLAIMS, _SWEEP_SECONDS = 1000, 60.0

# Commits by this connection do not change its own PRAGMA data_version, so pushes made in
# this process also bump a counter per database file that wait() watches.
_pushed = threading.Condition()
_push_counts: dict[str, int] = {}


def _notify_push(key: str) -> None:
    with _pushed:
        _push_counts[key] = _push_counts.get(key, 0) + 1
        _pushed.notify_all()


def _lenient_text(raw: bytes) -> str:
    """Decode stored text without raising, so a damaged row never breaks get/list/claim."""
    return raw.decode("utf-8", "replace")


def _as_float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


class SqliteBackend(Backend):
    """One queue in a SQLite file; safe for many processes on one host (not over NFS)."""

    def __init__(
        self,
        path: str,
        queue_name: str,
        *,
        busy_timeout: float = 30.0,
        synchronous: str = "FULL",
        result_ttl: float = 7 * 24 * 3600,
    ) -> None:
        if synchronous.upper() not in _SYNC_MODES:
            raise ConfigError(f"synchronous: {synchronous!r} is not one of {sorted(_SYNC_MODES)}")
        self.path, self.queue_name, self.safe_url = path, queue_name, f"sqlite:///{path}"
        self._busy_timeout, self._result_ttl = busy_timeout, result_ttl
        self._key = path if path == ":memory:" else os.path.realpath(path)
        self._claims, self._swept = 0, float("-inf")
        self._conn: sqlite3.Connection | None = self._open(synchronous.upper())
        self._seen_version, self._seen_pushes = self._data_version(), self._push_count()

    # -- connection and errors ----------------------------------------------------------------

    def _open(self, synchronous: str) -> sqlite3.Connection:
        if self.path != ":memory:":
            if os.path.isdir(self.path):
                raise BrokerUnavailableError(
                    f"SQLite path {self.path} is a directory; point sqlite_path at a file "
                    f"such as {os.path.join(self.path, 'conveyor.db')}"
                )
            parent = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise BrokerUnavailableError(
                    f"cannot create directory {parent} for SQLite database {self.path}: "
                    f"{exc.strerror}; create it or choose a writable sqlite_path"
                ) from exc
        with self._errors():
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None,
                check_same_thread=False,
            )  # fmt: skip
            conn.text_factory = _lenient_text
            try:
                self._setup(conn, synchronous)
            except BaseException:
                conn.close()
                raise
        return conn

    def _setup(self, conn: sqlite3.Connection, synchronous: str) -> None:
        """Switch to WAL and create the schema once, even when many processes start at once.

        Changing the journal mode of a fresh file can report busy without waiting, so the
        whole step is retried until ``busy_timeout``.
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {synchronous}")
                if conn.execute("PRAGMA user_version").fetchone()[0] < sql.SCHEMA_VERSION:
                    conn.execute("BEGIN IMMEDIATE")
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    for statement in sql.SCHEMA:
                        conn.execute(statement)
                    for target in range(version + 1, sql.SCHEMA_VERSION + 1):
                        for statement in sql.MIGRATIONS.get(target, ()) if version else ():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                return
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if _primary_code(exc) not in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BackendError(f"the SQLite backend for {self.path} is closed")
        return self._conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate sqlite3 errors into Conveyor's: nothing above a backend sees sqlite3."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> ConveyorError:
        code, path = _primary_code(exc), self.path
        if code in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            return BackendError(
                f"{path} is not a SQLite database or is corrupt ({exc}); restore it from a "
                "backup or point sqlite_path at a new file"
            )
        if code in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            return BrokerUnavailableError(
                f"SQLite database {path} stayed locked longer than busy_timeout "
                f"({self._busy_timeout}s); another process holds a long transaction"
            )
        if code in ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH"):
            return BrokerUnavailableError(
                f"cannot open or write SQLite database {path} ({exc}); make the file and its "
                "directory writable by this user (WAL also creates -wal and -shm files next "
                "to it) and keep it on a local disk"
            )
        if code in ("SQLITE_IOERR", "SQLITE_FULL"):
            return BrokerUnavailableError(f"disk error on SQLite database {path}: {exc}")
        return BackendError(f"SQLite error on {path}: {exc}")

    @contextmanager
    def _write(self) -> Iterator[float]:
        """One ``BEGIN IMMEDIATE`` transaction; yields the time read once the lock is held."""
        with self._errors():
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield time.time()
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def _next_seq(self) -> int:
        highest = self._db().execute(sql.NEXT_SEQ).fetchone()[0]
        return int(highest or 0) + 1

    def _data_version(self) -> int:
        with self._errors():
            return int(self._db().execute("PRAGMA data_version").fetchone()[0])

    def _push_count(self) -> int:
        with _pushed:
            return _push_counts.get(self._key, 0)

    # -- producing ----------------------------------------------------------------------------

    def enqueue(self, tasks: Sequence[NewTask]) -> list[bool]:
        if not tasks:
            return []
        stored: list[bool] = []
        with self._write() as now:
            db = self._db()
            ids = json.dumps([task.task_id for task in tasks])
            live = {row[0] for row in db.execute(sql.LIVE_IDS, (self.queue_name, ids))}
            seq, rows = self._next_seq(), list[tuple[Any, ...]]()
            for task in tasks:
                stored.append(task.task_id not in live)
                if stored[-1]:
                    live.add(task.task_id)  # a second copy in the same batch is a duplicate
                    rows.append(self._new_row(task, now, seq + len(rows)))
            db.executemany(sql.INSERT, rows)
        if rows:
            _notify_push(self._key)
        return stored

    def _new_row(self, task: NewTask, now: float, seq: int) -> tuple[Any, ...]:
        delayed = task.delay > 0
        event = {"at": now, "event": "scheduled" if delayed else "pushed", "attempt": 0}
        # The order of sql.COLUMNS: ROW_FIELDS, then token, lease_until, ready_at, seq.
        return (
            task.task_id, self.queue_name, task.type, task.priority, task.data_json,
            "scheduled" if delayed else "pending", 0, 0, task.max_retries, task.retry_backoff,
            task.queue_timeout, task.process_timeout, now, now + task.delay if delayed else None,
            None, None, now, 0.0, None, None, None, None, 0,
            json.dumps(event, separators=(",", ":")) + "\n", None, None,
            None, None, None if delayed else now, seq,
        )  # fmt: skip

    # -- consuming ----------------------------------------------------------------------------

    def claim(
        self, lease_seconds: float | None, max_deliveries: int, *, consumer: str = ""
    ) -> ClaimResult:
        return self._claim_tx(None, lease_seconds, max_deliveries, consumer)[1]

    def ack_and_claim(
        self,
        task_id: str,
        token: str,
        result_json: str | None,
        lease_seconds: float,
        max_deliveries: int,
        *,
        consumer: str = "",
    ) -> tuple[bool, ClaimResult]:
        """Ack and claim in one transaction: one fsync instead of two."""
        ack = (task_id, token, result_json)
        return self._claim_tx(ack, lease_seconds, max_deliveries, consumer)

    def _claim_tx(
        self,
        ack: tuple[str, str, str | None] | None,
        lease: float | None,
        max_deliveries: int,
        consumer: str,
    ) -> tuple[bool, ClaimResult]:
        self._maybe_sweep()  # first: if it fails, nothing has been claimed yet
        self._seen_pushes = self._push_count()
        with self._write() as now:
            acked = ack is not None and self._ack(now, *ack)
            # Read inside the write lock: any later commit by another process changes it.
            self._seen_version = int(self._db().execute("PRAGMA data_version").fetchone()[0])
            return acked, self._claim(now, lease, max_deliveries, consumer)

    def _claim(
        self, now: float, lease: float | None, max_deliveries: int, consumer: str
    ) -> ClaimResult:
        db = self._db()
        params = {"queue": self.queue_name, "now": now, "max": max_deliveries}
        for statement in (sql.PROMOTE, sql.REAP_CANCELED, sql.REAP_POISON, sql.REAP_RETURN):
            db.execute(statement, params)
        for _ in range(_MAX_SKIPS):
            row = db.execute(sql.PICK, (self.queue_name,)).fetchone()
            if row is None:
                return ClaimResult(None, self._wait_hint(now))
            claimed = self._take(row[0], now, lease, consumer)
            if claimed is not None:
                return ClaimResult(claimed)
        return ClaimResult(None, 0.0)  # many rows skipped: the caller claims again at once

    def _take(self, rowid: int, now: float, lease: float | None, consumer: str) -> Claimed | None:
        """Lease one pending row, or retire it (timeout, malformed) and return None."""
        cursor = self._db().cursor()
        cursor.row_factory = sqlite3.Row
        row = cursor.execute(sql.CLAIM_ROW, (rowid,)).fetchone()
        params: dict[str, Any] = {"rowid": rowid, "now": now}
        if _timed_out(now, row["queue_timeout"], row["ready_at"], row["started_at"]):
            cursor.execute(sql.TIME_OUT, params)
            return None
        if not isinstance(row["id"], str) or not self._is_utf8(rowid, row["id"], row["data"]):
            cursor.execute(sql.MALFORMED, params)
            return None
        try:
            attempt = int(row["attempts"] or 0) + 1
        except (TypeError, ValueError, OverflowError):
            attempt = 1
        token = uuid.uuid4().hex
        deadline = None if lease is None else now + lease
        cursor.execute(
            sql.TAKE,
            {**params, "attempt": attempt, "token": token, "lease": deadline, "worker": consumer},
        )
        return Claimed(
            task_id=row["id"], token=token, attempts=attempt, priority=row["priority"],
            data_json=row["data"], type=None if row["type"] is None else str(row["type"]),
            max_retries=row["max_retries"], retry_backoff=row["retry_backoff"],
            process_timeout=row["process_timeout"], created_at=row["created_at"],
            steps_json=row["steps"],
        )  # fmt: skip

    def _is_utf8(self, rowid: int, task_id: str, data: Any) -> bool:
        """Reads replace bad bytes with U+FFFD; only then check the stored bytes themselves."""
        if "\ufffd" not in task_id and not (isinstance(data, str) and "\ufffd" in data):
            return True
        try:
            for raw in self._db().execute(sql.RAW_TEXT, (rowid,)).fetchone():
                if isinstance(raw, bytes):
                    raw.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def _wait_hint(self, now: float) -> float | None:
        db = self._db()
        times = [_as_float(db.execute(query, (self.queue_name,)).fetchone()[0])
                 for query in (sql.NEXT_DUE, sql.NEXT_EXPIRY)]  # fmt: skip
        known = [t for t in times if t is not None]
        return max(0.0, min(known) - now) if known else None

    def _maybe_sweep(self) -> None:
        """Delete old finished rows now and then; failed rows stay as the dead-letter list."""
        self._claims += 1
        if self._claims < _SWEEP_CLAIMS and time.monotonic() - self._swept < _SWEEP_SECONDS:
            return
        self._claims, self._swept = 0, time.monotonic()
        with self._write() as now:
            self._db().execute(
                sql.SWEEP, {"queue": self.queue_name, "before": now - self._result_ttl}
            )

    def wait(self, timeout: float) -> None:
        """Poll ``PRAGMA data_version`` (cheap: shared memory) every 5 ms; a push made in this
        process wakes it at once through a condition variable."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                with _pushed:
                    if _push_counts.get(self._key, 0) != self._seen_pushes:
                        return
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    _pushed.wait(min(_POLL_SECONDS, remaining))
                if self._data_version() != self._seen_version:
                    return
        finally:
            self._seen_version, self._seen_pushes = self._data_version(), self._push_count()

    # -- settling -----------------------------------------------------------------------------

    def _ack(self, now: float, task_id: str, token: str, result_json: str | None) -> bool:
        params = {"queue": self.queue_name, "id": task_id, "token": token, "now": now}
        return self._db().execute(sql.ACK, {**params, "result": result_json}).rowcount == 1

    def ack(self, task_id: str, token: str, result_json: str | None) -> bool:
        with self._write() as now:
            return self._ack(now, task_id, token, result_json)

    def nack(
        self, task_id: str, token: str, delay: float, error_json: str | None, count_attempt: bool
    ) -> bool:
        with self._write() as now:
            later = delay > 0
            event = ("retry_scheduled" if later else "requeued") if count_attempt else "interrupted"
            changed = self._update(
                sql.NACK, now, task_id, token=token, error=error_json, event=event,
                status="scheduled" if later else "pending", due=now + delay if later else None,
                ready=None if later else now, seq=self._next_seq(),
                give_back=int(not count_attempt),
            )  # fmt: skip
            changed = changed or self._update(
                sql.NACK_CANCELED, now, task_id, token=token, error=error_json
            )
        if changed:
            _notify_push(self._key)
        return changed

    def fail(
        self,
        task_id: str,
        token: str | None,
        reason: str,
        error_json: str | None,
        *,
        status: str = "failed",
    ) -> bool:
        statement = (
            sql.FAIL
            if token is None
            else f"{sql.FAIL} AND status = 'processing' AND token = :token"
        )
        with self._write() as now:
            return self._update(
                statement, now, task_id, token=token, reason=reason, error=error_json,
                status=status,
            )  # fmt: skip

    def checkpoint(self, task_id: str, token: str, steps_json: str) -> bool:
        with self._write() as now:
            return self._update(sql.CHECKPOINT, now, task_id, token=token, steps=steps_json)

    def extend(self, task_id: str, token: str, lease_seconds: float) -> bool:
        with self._write() as now:
            return self._update(sql.EXTEND, now, task_id, token=token, deadline=now + lease_seconds)

    def set_progress(self, task_id: str, token: str, progress: float, message: str | None) -> bool:
        with self._write() as now:
            return self._update(
                sql.PROGRESS, now, task_id, token=token, progress=progress, message=message
            )

    def cancel(self, task_id: str) -> bool:
        with self._write() as now:
            canceled = self._update(sql.CANCEL, now, task_id)
            return canceled or self._update(sql.CANCEL_RUNNING, now, task_id)

    def retry(self, task_id: str) -> bool:
        with self._write() as now:
            changed = self._update(sql.RETRY, now, task_id, seq=self._next_seq())
        if changed:
            _notify_push(self._key)
        return changed

    def _update(self, statement: str, now: float, task_id: str, **params: Any) -> bool:
        params.update(queue=self.queue_name, id=task_id, now=now)
        return self._db().execute(statement, params).rowcount > 0

    # -- inspecting ---------------------------------------------------------------------------

    def get(self, task_id: str) -> dict[str, Any] | None:
        with self._errors():
            row = self._db().execute(sql.GET, (self.queue_name, task_id)).fetchone()
        return None if row is None else dict(zip(ROW_FIELDS, row, strict=True))

    def list(self, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        with self._errors():
            if status is None:
                cursor = self._db().execute(sql.LIST_ALL, (self.queue_name, limit, offset))
            elif status == TaskStatus.PENDING:
                cursor = self._db().execute(sql.LIST_PENDING, (self.queue_name, limit, offset))
            else:
                cursor = self._db().execute(
                    sql.LIST_STATUS, (self.queue_name, status, limit, offset)
                )
            return [dict(zip(ROW_FIELDS, row, strict=True)) for row in cursor]

    def counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in TaskStatus}
        with self._errors():
            for status, number in self._db().execute(sql.COUNTS, (self.queue_name,)):
                if status in counts:
                    counts[status] = number
        return counts

    def recent(self, seconds: float) -> tuple[int, int, float | None]:
        with self._errors():
            since = time.time() - seconds
            done, failed, mean = self._db().execute(sql.RECENT, (self.queue_name, since)).fetchone()
        return int(done), int(failed), _as_float(mean)

    def size(self) -> int:
        with self._errors():
            return int(self._db().execute(sql.SIZE, (self.queue_name,)).fetchone()[0])

    def purge(self) -> int:
        with self._write():
            ready = int(self._db().execute(sql.SIZE, (self.queue_name,)).fetchone()[0])
            self._db().execute(sql.PURGE, (self.queue_name,))
        return ready

    def purge_finished(self, status: str, limit: int) -> int:
        with self._write():
            cursor = self._db().execute(sql.PURGE_STATUS, (self.queue_name, status, limit))
        return int(cursor.rowcount)

    def known_queues(self) -> Sequence[str]:
        with self._errors():
            rows = self._db().execute("SELECT DISTINCT queue FROM tasks ORDER BY queue")
            names = {str(row[0]) for row in rows if row[0] is not None}
        return sorted(names | {self.queue_name})

    # -- the worker registry ------------------------------------------------------------------

    def register_worker(self, worker_id: str, info_json: str, ttl: float) -> bool:
        with self._write() as now:
            db = self._db()
            db.execute("DELETE FROM workers WHERE expires_at < ?", (now,))
            row = db.execute(sql.HEARTBEAT, (worker_id, info_json, now, now + ttl)).fetchone()
        return bool(row and row[0])

    def unregister_worker(self, worker_id: str) -> None:
        with self._write():
            self._db().execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def list_workers(self) -> Sequence[str]:
        with self._errors():
            rows = self._db().execute(
                "SELECT info FROM workers WHERE expires_at >= ? ORDER BY id", (time.time(),)
            )
            return [str(row[0]) for row in rows]

    def request_stop(self, worker_id: str | None) -> int:
        with self._write() as now:
            sql = "UPDATE workers SET stop_requested = 1 WHERE expires_at >= ?"
            if worker_id is None:
                return int(self._db().execute(sql, (now,)).rowcount)
            return int(self._db().execute(f"{sql} AND id = ?", (now, worker_id)).rowcount)

    def ping(self) -> None:
        try:
            with self._errors():
                self._db().execute("SELECT 1 FROM tasks LIMIT 1").fetchall()
        except BackendError as exc:
            raise BrokerUnavailableError(str(exc)) from exc

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with suppress(sqlite3.Error):
                conn.close()


def _primary_code(exc: sqlite3.Error) -> str:
    """``SQLITE_BUSY_SNAPSHOT`` -> ``SQLITE_BUSY``; empty for errors raised by the driver."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return "_".join(name.split("_")[:2])


def _timed_out(now: float, queue_timeout: Any, ready_at: Any, started_at: Any) -> bool:
    """Has the task waited longer than ``queue_timeout`` without starting since it was ready?"""
    limit, ready, started = _as_float(queue_timeout), _as_float(ready_at), _as_float(started_at)
    if limit is None or ready is None or (started is not None and started >= ready):
        return False
    return now > ready + limit
