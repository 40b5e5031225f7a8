"""PostgreSQL beyond the shared suites: claims that do not block, restarts and cut
connections mid-drain (each ending with a ledger), the schema's migrations, ``doctor``.

The conformance, transition-table and differential suites run on PostgreSQL too; this file
holds what only a SQL server with SKIP LOCKED and LISTEN/NOTIFY is asked to do.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import wait_until
from conveyor import BrokerUnavailableError, QueueManager
from conveyor.doctor import Finding
from conveyor.settings import Settings
from helpers import run_ledger
from helpers.private_postgres import PrivatePostgres, postgres_installed
from helpers.worker_process import WorkerProcess
from test_outages import (
    BACK,
    GONE,
    RESUME_LIMIT,
    finish,
    push,
    restart,
    resumed_after,
    start_workers,
    stay_alive,
    wait_for_successes,
)

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parent.parent
Workers = Callable[..., WorkerProcess]


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL 15 server of this module's own, which its tests crash and restart."""
    if not postgres_installed():
        pytest.skip("PostgreSQL 15's initdb/pg_ctl are not installed")
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- claims ---------------------------------------------------------------------------------


def test_four_processes_draining_one_queue_each_get_a_share(postgres_url: str) -> None:
    """SKIP LOCKED: no claim waits on another, so no process takes (nearly) everything."""
    found = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "claim_split.py"), "--url", postgres_url,
         "--tasks", "1200", "--processes", "4", "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    result = json.loads(found.stdout)
    print(f"claim split: {result}")
    assert sum(result["split"]) == 1200 and result["succeeded"] == 1200
    assert min(result["split"]) > 0, f"a process got nothing: {result['split']}"
    assert max(result["split"]) < 1200 * 0.7, f"one process took most: {result['split']}"


def test_a_claim_skips_rows_another_transaction_holds(postgres_url: str) -> None:
    """A row locked by another session (a claim in flight) is skipped, not waited for."""
    import psycopg

    queue = QueueManager.from_url(postgres_url, queue_name=f"skip-{uuid.uuid4().hex[:6]}")
    try:
        assert queue.push("first", 1, priority=5) and queue.push("second", 2, priority=5)
        with psycopg.connect(postgres_url) as conn:  # holds the row lock until the end
            conn.execute(
                "SELECT 1 FROM conveyor.tasks WHERE queue = %s AND id = 'first' FOR UPDATE",
                (queue.queue_name,),
            )
            started = time.monotonic()
            message = queue.reserve(timeout=0)
            assert message is not None and message.task_id == "second"
            assert time.monotonic() - started < 5
        message = queue.reserve(timeout=0)
        assert message is not None and message.task_id == "first"
    finally:
        queue.clear()
        queue.close()


# -- the event log ----------------------------------------------------------------------------


def test_an_event_committed_late_by_an_older_transaction_is_not_skipped(postgres_url: str) -> None:
    """Ids are taken before commit: a reader must not pass the event of a transaction still
    open (its id lower) because a later one committed first. It waits for it, in order."""
    import psycopg

    queue = QueueManager.from_url(postgres_url, queue_name=f"late-{uuid.uuid4().hex[:6]}")
    log = queue.server.events(queue.queue_name)
    try:
        assert queue.push("a", 1)
        start = log.tail()
        with psycopg.connect(postgres_url) as conn:  # one transaction, open until the end
            conn.execute(
                "UPDATE conveyor.tasks SET progress = 0.25 WHERE queue = %s AND id = 'a'",
                (queue.queue_name,),
            )
            assert queue.push("b", 2)  # commits first, with a later transaction
            assert log.read(start, 10, 0) == []  # b waits behind the open transaction
        events = log.read(start, 10, 5)
        assert [(e.task_id, e.event) for e in events] == [("a", "progress"), ("b", "pushed")]
        assert events[0].progress == 0.25
    finally:
        log.close()
        queue.clear()
        queue.close()


def test_a_version_1_schema_gets_the_event_log_and_counts_from_then_on(
    postgres_url: str,
) -> None:
    """A schema migrated by the first release (no event log) is brought to version 2."""
    import psycopg

    schema = f"s_{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}?schema={schema}"
    QueueManager.from_url(url, queue_name="one").close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # back to version 1
        conn.execute(f"DELETE FROM {schema}.migrations WHERE version = 2")
        for name in ("pushed", "transition", "progress", "checkpoint"):
            conn.execute(f"DROP TRIGGER tasks_event_{name} ON {schema}.tasks")
        conn.execute(f"DROP TABLE {schema}.events, {schema}.event_counters, {schema}.event_trims")
    queue = QueueManager.from_url(url, queue_name="one")
    try:
        assert queue.push("x", 1)
        assert queue.event_log().counters() == {"pushed": 1}
    finally:
        queue.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


# -- restarts and cut connections -------------------------------------------------------------


@pytest.mark.slow
def test_server_restarted_mid_drain_nothing_lost_and_no_worker_exits(
    private_postgres: PrivatePostgres, worker_process: Workers, tmp_path: Path
) -> None:
    server, name, ledger = private_postgres, f"restart-{uuid.uuid4().hex[:6]}", tmp_path / "l"
    queue = QueueManager.from_url(server.url, queue_name=name, connect_timeout=1)
    ids = push(queue, 400, ledger, sleep=0.05)
    workers = start_workers(worker_process, server.url, 2, "-Q", name, "-c", "2")
    pids = [worker.proc.pid for worker in workers]
    wait_for_successes(queue, 100)
    server.kill()
    for worker in workers:
        wait_until(lambda w=worker: GONE in w.log(), 20, message="the outage line")
    stay_alive(workers, 5)
    answered = restart(server.start, server.answers)
    resume = resumed_after(workers, answered)
    print(f"PostgreSQL restarted: work resumed {resume:.2f}s after it answered")
    assert resume < RESUME_LIMIT
    for worker in workers:
        wait_until(lambda w=worker: BACK in w.log(), 20, message="the back line")
    wait_for_successes(queue, len(ids), timeout=120)
    result = run_ledger.check(queue, ids, ledger, "postgres restarted")
    assert result.lost == []
    finish(workers, pids)
    queue.clear()
    queue.close()


@pytest.mark.slow
def test_connections_cut_mid_drain_nothing_lost_and_no_worker_exits(
    private_postgres: PrivatePostgres, worker_process: Workers, tmp_path: Path
) -> None:
    """Every connection to the server but ours is terminated (pool and LISTEN ones) twice."""
    import psycopg

    server, name, ledger = private_postgres, f"cut-{uuid.uuid4().hex[:6]}", tmp_path / "l"
    if not server.answers():
        server.start()
    queue = QueueManager.from_url(server.url, queue_name=name, connect_timeout=1)
    ids = push(queue, 300, ledger, sleep=0.05)
    workers = start_workers(worker_process, server.url, 2, "-Q", name, "-c", "2")
    pids = [worker.proc.pid for worker in workers]
    for progress in (60, 150):
        wait_for_successes(queue, progress)
        with psycopg.connect(server.url, autocommit=True) as conn:
            cut = conn.execute(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"""
            ).fetchone()
        assert cut is not None and cut[0] > 0
    wait_for_successes(queue, len(ids), timeout=120)
    result = run_ledger.check(queue, ids, ledger, "postgres connections cut")
    assert result.lost == []
    finish(workers, pids)
    queue.clear()
    queue.close()


def test_an_unreachable_server_is_broker_unavailable_with_the_url_masked() -> None:
    from helpers.private_redis import free_port

    url = f"postgresql://conveyor:secret@127.0.0.1:{free_port()}/conveyor"
    with pytest.raises(BrokerUnavailableError) as caught:
        QueueManager.from_url(url, connect_timeout=1)
    assert "secret" not in str(caught.value) and "127.0.0.1" in str(caught.value)


def test_a_missing_database_or_role_is_said_at_once(postgres_url: str) -> None:
    """Not an outage to wait out: a worker exits 2 on these instead of waiting forever."""
    from conveyor import BrokerAuthenticationError, ConfigError

    base = postgres_url.rsplit("/", 1)[0]
    with pytest.raises(ConfigError, match="does not exist"):
        QueueManager.from_url(f"{base}/conveyor_no_such_db", connect_timeout=2)
    nobody = base.replace("postgres@", "conveyor_no_such_role@")
    with pytest.raises(BrokerAuthenticationError, match="credentials"):
        QueueManager.from_url(f"{nobody}/postgres", connect_timeout=2)


# -- schema -----------------------------------------------------------------------------------


def test_the_schema_is_configurable_and_migrated_once(postgres_url: str) -> None:
    import psycopg

    schema = f"s_{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}?schema={schema}"
    first = QueueManager.from_url(url, queue_name="one")
    second = QueueManager.from_url(url, queue_name="one")  # finds it migrated
    try:
        assert first.push("x", 1)
        message = second.reserve(timeout=0)
        assert message is not None and message.task_id == "x"
        with psycopg.connect(postgres_url) as conn:
            versions = conn.execute(f"SELECT version FROM {schema}.migrations").fetchall()
            elsewhere = conn.execute(
                "SELECT count(*) FROM conveyor.tasks WHERE queue = 'one' AND id = 'x'"
            ).fetchone()
        assert versions == [(1,), (2,)]
        assert elsewhere == (0,)
    finally:
        first.close()
        second.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_a_bad_schema_name_is_a_clear_config_error(postgres_url: str) -> None:
    from conveyor import ConfigError

    with pytest.raises(ConfigError, match="schema"):
        QueueManager.from_url(f"{postgres_url}?schema=Robert'); DROP", queue_name="x")


# -- doctor -----------------------------------------------------------------------------------


def findings(url: str, check: str) -> list[Finding]:
    from conveyor.doctor.stores import check_postgres, check_task_store

    settings = Settings(url=url)  # type: ignore[arg-type]
    return [f for f in check_postgres(settings) + check_task_store(settings) if f.check == check]


def test_doctor_checks_the_schema_version_and_wake_ups(postgres_url: str) -> None:
    import psycopg

    QueueManager.from_url(postgres_url).close()
    (schema,) = findings(postgres_url, "postgres schema")
    assert schema.status == "ok" and "version 2" in schema.message
    (wake,) = findings(postgres_url, "postgres wake-ups")
    assert wake.status == "ok"
    newer = f"s_{uuid.uuid4().hex[:8]}"
    QueueManager.from_url(f"{postgres_url}?schema={newer}").close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {newer}.migrations (version) VALUES (99)")
    try:
        (schema,) = findings(f"{postgres_url}?schema={newer}", "postgres schema")
        assert schema.status == "problem" and "newer" in schema.message and schema.fix
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {newer} CASCADE")


def test_doctor_warns_about_a_relative_sqlite_task_store_for_rabbitmq(
    postgres_url: str, tmp_path: Path
) -> None:
    broker = "amqp://guest:guest@127.0.0.1:5672/"
    (relative,) = findings(f"{broker}?task_store=sqlite:///tasks.db", "task store")
    assert relative.status == "warning" and "relative" in relative.message
    assert relative.fix is not None and "postgresql://" in relative.fix
    (absolute,) = findings(f"{broker}?task_store=sqlite:///{tmp_path}/t.db", "task store")
    assert absolute.status == "ok"
    (shared,) = findings(f"{broker}?task_store={postgres_url}", "task store")
    assert shared.status == "ok"
    assert findings(f"{broker}?task_store={postgres_url}", "postgres schema")[0].status == "ok"


@pytest.mark.rabbitmq
def test_rabbitmq_over_a_postgres_task_store(postgres_url: str) -> None:
    from conftest import delete_rabbitmq_queues, rabbitmq_url, require_rabbitmq_server

    require_rabbitmq_server()
    name = f"rmq-{uuid.uuid4().hex[:6]}"
    url = rabbitmq_url(Path("/nonexistent"), store=postgres_url)
    producer = QueueManager.from_url(url, queue_name=name)
    consumer = QueueManager.from_url(url, queue_name=name)
    try:
        assert producer.push("low", 1, priority=1) and producer.push("high", 2, priority=9)
        assert producer.push("later", 3, priority=9, delay=0.3)
        first = consumer.reserve(timeout=5)
        assert first is not None and first.task_id == "high"
        assert consumer.nack(first)  # a new ticket, published again
        taken = [consumer.reserve(timeout=5) for _ in range(3)]
        assert sorted(m.task_id for m in taken if m) == ["high", "later", "low"]
        for message in taken:
            assert message is not None and consumer.ack(message)
        record = producer.get_task("high")
        assert record is not None and record.attempts == 2 and record.status == "success"
    finally:
        producer.clear()
        producer.close()
        consumer.close()
        delete_rabbitmq_queues(name)
