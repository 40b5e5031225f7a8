"""One SQLite file: the connection, its schema and migrations, errors, and transactions.

Every change is a single ``BEGIN IMMEDIATE`` transaction, so two processes can never both
claim a task and a crash mid-change leaves the previous state. WAL does not work on network
filesystems: keep the file on a local disk.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from ...errors import BackendError, BrokerUnavailableError, ConfigError, ConveyorError
from . import events_sql, keylimits, sql

_SYNC_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})

# Commits by this connection do not change its own PRAGMA data_version, so pushes made in
# this process also bump a counter per database file that waiters watch.
_pushed = threading.Condition()
_push_counts: dict[str, int] = {}


def _lenient_text(raw: bytes) -> str:
    """Decode stored text without raising, so a damaged row never breaks get/list/claim."""
    return raw.decode("utf-8", "replace")


def primary_code(exc: sqlite3.Error) -> str:
    """``SQLITE_BUSY_SNAPSHOT`` -> ``SQLITE_BUSY``; empty for errors raised by the driver."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return "_".join(name.split("_")[:2])


class Database:
    """A SQLite file shared by every queue of a server in this process (one connection)."""

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float = 30.0,
        synchronous: str = "FULL",
        create: bool = True,
    ) -> None:
        if synchronous.upper() not in _SYNC_MODES:
            raise ConfigError(f"synchronous: {synchronous!r} is not one of {sorted(_SYNC_MODES)}")
        self.path, self.safe_url = path, f"sqlite:///{path}"
        self.busy_timeout = busy_timeout
        self.key = path if path == ":memory:" else os.path.realpath(path)
        self._conn: sqlite3.Connection | None = self._open(synchronous.upper(), create)

    # -- opening ----------------------------------------------------------------------------

    def _open(self, synchronous: str, create: bool) -> sqlite3.Connection:
        if self.path != ":memory:":
            if os.path.isdir(self.path):
                raise BrokerUnavailableError(
                    f"SQLite path {self.path} is a directory; point sqlite_path at a file "
                    f"such as {os.path.join(self.path, 'conveyor.db')}"
                )
            parent = os.path.dirname(os.path.abspath(self.path))
            if not create and not os.path.exists(self.path):
                raise BrokerUnavailableError(
                    f"no SQLite database at {self.path}; check the path (a reader never "
                    "creates one)"
                )
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise BrokerUnavailableError(
                    f"cannot create directory {parent} for SQLite database {self.path}: "
                    f"{exc.strerror}; create it or choose a writable sqlite_path"
                ) from exc
        with self.errors():
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None,
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
        """Switch to WAL and create or migrate the schema once, even when many processes
        start at once. Changing the journal mode of a fresh file can report busy without
        waiting, so the whole step is retried until ``busy_timeout``."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {synchronous}")
                if conn.execute("PRAGMA user_version").fetchone()[0] < sql.SCHEMA_VERSION:
                    conn.execute("BEGIN IMMEDIATE")
                    self._migrate(conn)
                    conn.execute("COMMIT")
                return
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if primary_code(exc) not in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Create the schema, or bring a file an earlier version wrote up to this one."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version >= sql.SCHEMA_VERSION:
            return  # another process migrated it while we waited for the lock
        for statement in sql.SCHEMA:
            conn.execute(statement)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
        for added in sql.ADDED_COLUMNS.values():
            for column in added:
                if column.split()[0] not in columns:
                    conn.execute(f"ALTER TABLE tasks ADD COLUMN {column}")
        if version:  # a file with tasks in it: derive what the new columns would hold
            conn.execute(sql.BACKFILL_EXPIRE_AT)
        for statement in sql.LATE_SCHEMA:
            conn.execute(statement)
        for statement in keylimits.SCHEMA:  # version 4: per-key concurrency
            conn.execute(statement)
        if version < events_sql.VERSION:  # 6: the event log and counters (idempotent)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
            if events_sql.EVENT_LINE.split()[0] not in columns:
                conn.execute(f"ALTER TABLE tasks ADD COLUMN {events_sql.EVENT_LINE}")
            for statement in events_sql.SCHEMA:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")

    # -- using it ---------------------------------------------------------------------------

    def db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BackendError(f"the SQLite database {self.path} is closed")
        return self._conn

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Translate sqlite3 errors into Conveyor's: nothing above a backend sees sqlite3."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> ConveyorError:
        code, path = primary_code(exc), self.path
        if code in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            return BackendError(
                f"{path} is not a SQLite database or is corrupt ({exc}); restore it from a "
                "backup or point sqlite_path at a new file"
            )
        if code in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            return BrokerUnavailableError(
                f"SQLite database {path} stayed locked longer than busy_timeout "
                f"({self.busy_timeout}s); another process holds a long transaction"
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
    def write(self) -> Iterator[float]:
        """One ``BEGIN IMMEDIATE`` transaction; yields the time read once the lock is held
        (so it never goes backwards between transactions)."""
        with self.errors():
            db = self.db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield time.time()
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def next_seq(self) -> int:
        highest = self.db().execute(sql.NEXT_SEQ).fetchone()[0]
        return int(highest or 0) + 1

    def data_version(self) -> int:
        with self.errors():
            return int(self.db().execute("PRAGMA data_version").fetchone()[0])

    def notify_push(self) -> None:
        """Wake waiters of this file in this process (their data_version does not change)."""
        with _pushed:
            _push_counts[self.key] = _push_counts.get(self.key, 0) + 1
            _pushed.notify_all()

    def push_count(self) -> int:
        with _pushed:
            return _push_counts.get(self.key, 0)

    def wait_push(self, seen: int, timeout: float) -> bool:
        """Wait up to ``timeout`` for a push in this process; True if one came."""
        with _pushed:
            if _push_counts.get(self.key, 0) != seen:
                return True
            _pushed.wait(timeout)
            return _push_counts.get(self.key, 0) != seen

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with suppress(sqlite3.Error):
                conn.close()
