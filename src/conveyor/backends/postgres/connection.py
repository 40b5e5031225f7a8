"""One PostgreSQL database: the URL, the connection pool, migrations, errors.

Statements run in autocommit mode: each transition is one call of a server-side function,
so one statement is one transaction and one round trip. The pool (psycopg_pool) holds a
few connections; a connection that broke (a server restart, a cut network) is thrown away
when it comes back, and the call that met it raises ``BrokerUnavailableError``, which the
worker's outage handling rides out like any other backend's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ...errors import (
    BackendError,
    BrokerAuthenticationError,
    BrokerUnavailableError,
    ConfigError,
    ConveyorError,
)
from ...urls import mask_url
from . import schema

DEFAULT_SCHEMA = "conveyor"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
#: Noticed within ~10 s: a half-open connection (a cut cable) fails instead of hanging.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
               "keepalives_count": 3}  # fmt: skip


def split_url(url: str) -> tuple[str, str]:
    """``postgresql://...?schema=name`` -> (libpq conninfo URL, schema name)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = dict(item for item in query if item[0] == "schema")
    rest = [item for item in query if item[0] != "schema"]
    name = own.get("schema") or DEFAULT_SCHEMA
    if not _SCHEMA_NAME.match(name):
        raise ConfigError(
            f"url: schema {name!r} is not a plain lower-case SQL name (letters, digits, _); "
            "use e.g. ?schema=conveyor"
        )
    return urlunsplit(parts._replace(query=urlencode(rest))), name


class Database:
    """A pool of connections to one database, its schema migrated on first use."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, max_size: int = 4) -> None:
        self.conninfo, self.schema = split_url(url)
        self.safe_url = mask_url(url)
        self.channel = schema.channel(self.schema)
        self.connect_timeout = connect_timeout
        self.options: dict[str, Any] = {
            **_KEEPALIVES, "connect_timeout": max(2, round(connect_timeout)),
        }  # fmt: skip
        self._pool: ConnectionPool | None = ConnectionPool(
            self.conninfo, min_size=1, max_size=max_size, open=False, num_workers=1,
            timeout=connect_timeout, kwargs={"autocommit": True, **self.options},
            name=f"conveyor:{self.schema}",
        )  # fmt: skip
        try:
            with self.errors():
                # One plain connection first: refused credentials or a missing database
                # say so at once, where the pool would only time out.
                psycopg.connect(self.conninfo, autocommit=True, **self.options).close()
                self._pool.open(wait=True, timeout=connect_timeout)
                self.migrate()
        except BaseException:
            self.close()
            raise

    # -- using it ---------------------------------------------------------------------------

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection, errors translated (nothing above a backend sees psycopg)."""
        if self._pool is None:
            raise BackendError(f"the PostgreSQL connection to {self.safe_url} is closed")
        with self.errors(), self._pool.connection() as conn:
            yield conn

    def call(self, sql: str, params: tuple[Any, ...] | list[Any], *, read: bool = False) -> Any:
        """Run one statement and return the first column of its first row (or None)."""
        rows = self.rows(sql, params, read=read)
        return rows[0][0] if rows else None

    def rows(
        self, sql: str, params: tuple[Any, ...] | list[Any], *, read: bool = False
    ) -> list[tuple[Any, ...]]:
        """Run one statement, return its rows. After a lost connection the pool's idle
        connections are checked (a restarted server broke them all) and a ``read`` is tried
        once more; a transition is not, since it may have committed before the loss."""
        try:
            return self._rows(sql, params)
        except BrokerUnavailableError:
            if self._pool is not None:
                with suppress(Exception):
                    self._pool.check()
            if not read:
                raise
            return self._rows(sql, params)

    def read(self, sql: str, params: tuple[Any, ...] | list[Any]) -> Any:
        """:meth:`call` for a statement that may run twice (a read, an idempotent write)."""
        return self.call(sql, params, read=True)

    def reads(self, sql: str, params: tuple[Any, ...] | list[Any]) -> list[tuple[Any, ...]]:
        """:meth:`rows` for a statement that may run twice (a read, an idempotent write)."""
        return self.rows(sql, params, read=True)

    def _rows(self, sql: str, params: tuple[Any, ...] | list[Any]) -> list[tuple[Any, ...]]:
        with self.connection() as conn:
            cursor = conn.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except ConveyorError:
            raise
        except PoolTimeout as exc:
            raise BrokerUnavailableError(
                f"no PostgreSQL connection to {self.safe_url} within {self.connect_timeout:g}s "
                f"({exc}); is the server running and reachable?"
            ) from exc
        except psycopg.Error as exc:
            raise translate(exc, self.safe_url) from exc

    # -- migrations -------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to :data:`schema.SCHEMA_VERSION`, once, even when many processes
        start at once: the steps run in one transaction under an advisory lock."""
        with self.connection() as conn:
            if self.applied_version(conn) >= schema.SCHEMA_VERSION:
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.schema,))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                conn.execute(
                    f"""CREATE TABLE IF NOT EXISTS {self.schema}.migrations (
                    version integer PRIMARY KEY, applied_at timestamptz DEFAULT now())"""
                )
                done = self.applied_version(conn)
                for version, statements in sorted(schema.migrations(self.schema).items()):
                    if version <= done:
                        continue
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute(
                        f"INSERT INTO {self.schema}.migrations (version) VALUES (%s)", (version,)
                    )

    def applied_version(self, conn: psycopg.Connection[Any] | None = None) -> int:
        """The highest migration applied to the schema (0: none, or no schema yet)."""
        if conn is None:
            with self.connection() as own:
                return self.applied_version(own)
        table = f"{self.schema}.migrations"
        found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        if not found or not found[0]:
            return 0
        row = conn.execute(f"SELECT coalesce(max(version), 0) FROM {table}").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with suppress(Exception):
                pool.close(timeout=1.0)


def translate(exc: psycopg.Error, safe_url: str) -> ConveyorError:
    """psycopg's errors as Conveyor's: a lost or refused connection is an outage."""
    text = " ".join(str(exc).split())
    if isinstance(exc, psycopg.OperationalError):
        if "database" in text and "does not exist" in text:
            return ConfigError(
                f"url: {text} on {safe_url}; create it (createdb NAME) or fix the URL"
            )
        if "authentication failed" in text or "password" in text or "role" in text:
            return BrokerAuthenticationError(
                f"PostgreSQL at {safe_url} refused the credentials ({text}); fix the user and "
                "password in the URL"
            )
        if isinstance(exc, psycopg.errors.InsufficientPrivilege | psycopg.errors.UndefinedTable):
            return BackendError(f"PostgreSQL error on {safe_url}: {text}")
        return BrokerUnavailableError(f"PostgreSQL at {safe_url} does not answer: {text}")
    if isinstance(exc, psycopg.InterfaceError):
        return BrokerUnavailableError(f"PostgreSQL connection to {safe_url} is gone: {text}")
    if isinstance(exc, psycopg.errors.AdminShutdown | psycopg.errors.CannotConnectNow):
        return BrokerUnavailableError(f"PostgreSQL at {safe_url} is restarting: {text}")
    return BackendError(f"PostgreSQL error on {safe_url}: {text}")
