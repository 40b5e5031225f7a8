"""Checks of where task records live: the PostgreSQL schema, and RabbitMQ's task store."""

from __future__ import annotations

import time

from ..backends import QueueBackend, backend_for_url, sqlite_path_from_url
from ..errors import ConveyorError
from ..settings import Settings
from ..urls import mask_url
from . import Finding


def _task_store_url(settings: Settings) -> str:
    """The task store a RabbitMQ deployment uses: the setting, the URL's, or the default."""
    from ..backends.rabbitmq.topology import DEFAULT_TASK_STORE, parse_url

    return (
        settings.rabbitmq.task_store
        or parse_url(settings.backend_url()).task_store
        or DEFAULT_TASK_STORE
    )


def check_task_store(settings: Settings) -> list[Finding]:
    """A SQLite task store named by a relative path is a different file for every working
    directory, and a file at all only on one host: producers and workers elsewhere would
    not see each other's tasks."""
    if backend_for_url(settings.backend_url()) is not QueueBackend.RABBITMQ:
        return []
    store = _task_store_url(settings)
    safe = mask_url(store)
    if backend_for_url(store) is not QueueBackend.SQLITE:
        return [Finding("task store", "ok", f"RabbitMQ keeps task records in {safe}")]
    if not sqlite_path_from_url(store).startswith("/"):
        return [
            Finding(
                "task store",
                "warning",
                f"RabbitMQ keeps task records in {safe}, a SQLite file through a relative "
                "path: processes started in another directory, or on another host, each "
                "open a store of their own and never see each other's tasks",
                "for several hosts set rabbitmq.task_store (or ?task_store=) to "
                "postgresql://... or redis://...; on one host, to an absolute sqlite path",
            )
        ]
    return [Finding("task store", "ok", f"RabbitMQ keeps task records in {safe} (one host only)")]


def check_postgres(settings: Settings) -> list[Finding]:
    """The schema's migrations (applied on first use, so a newer schema means an older
    Conveyor), and that LISTEN/NOTIFY wake-ups arrive (not through transaction pooling)."""
    url = settings.backend_url()
    if backend_for_url(url) is QueueBackend.RABBITMQ:
        url = _task_store_url(settings)
    if backend_for_url(url) is not QueueBackend.POSTGRES:
        return []
    try:
        from ..backends.postgres.connection import Database
        from ..backends.postgres.schema import SCHEMA_VERSION
    except ImportError as exc:
        fix = "pip install 'conveyor[postgres]'"
        return [Finding("postgres schema", "problem", f"cannot load psycopg: {exc}", fix)]
    try:
        database = Database(url, connect_timeout=5.0)
    except ConveyorError as exc:
        return [Finding("postgres schema", "problem", " ".join(str(exc).split()))]
    try:
        return [_schema_finding(database, SCHEMA_VERSION), _notify_finding(database)]
    finally:
        database.close()


def _schema_finding(database: object, expected: int) -> Finding:
    from ..backends.postgres.connection import Database

    assert isinstance(database, Database)
    version = database.applied_version()
    name = database.schema
    if version > expected:
        return Finding(
            "postgres schema", "problem",
            f"schema {name} is at version {version}, newer than this Conveyor knows "
            f"({expected}): a newer release migrated it",
            "upgrade Conveyor on this host to the release the other hosts run",
        )  # fmt: skip
    if version < expected:
        return Finding(
            "postgres schema", "problem",
            f"schema {name} is at version {version}, below {expected}: the migration did not "
            "run", "check that the user may CREATE in the database, then re-run",
        )  # fmt: skip
    return Finding("postgres schema", "ok", f"schema {name} is at version {version} (current)")


def _notify_finding(database: object) -> Finding:
    """Send one NOTIFY and wait for it on a LISTEN session of our own."""
    import psycopg

    from ..backends.postgres.connection import Database

    assert isinstance(database, Database)
    channel = f"{database.channel}_doctor"
    try:
        with psycopg.connect(database.conninfo, autocommit=True, **database.options) as conn:
            conn.execute(f"LISTEN {channel}")
            database.call("SELECT pg_notify(%s, 'ping')", (channel,))
            started = time.monotonic()
            for _ in conn.notifies(timeout=2.0, stop_after=1):
                took = (time.monotonic() - started) * 1000
                return Finding(
                    "postgres wake-ups", "ok", f"LISTEN/NOTIFY answered in {took:.1f} ms"
                )
    except (psycopg.Error, ConveyorError) as exc:
        return Finding("postgres wake-ups", "problem", " ".join(str(exc).split()))
    return Finding(
        "postgres wake-ups", "warning",
        "a NOTIFY did not arrive within 2 s: behind PgBouncer in transaction pooling mode "
        "LISTEN does not work, so idle workers notice new tasks only about once a second",
        "point the URL at PostgreSQL itself, or at a PgBouncer pool in session mode",
    )  # fmt: skip
