"""Damage written straight into storage, at random, never crashes, 500s or loses a task.

On each backend (SQLite, Redis, RabbitMQ over each of its task stores) every example pushes
a few tasks, puts one of them in a random state (pending, held by a consumer, finished),
then writes one random damaged value straight into one random stored field: a Redis hash
field, the type of the task's key, an index's score or member; a SQLite column. Then it runs
what a deployment runs: the held task's ack, claims and acks until the queue is drained (with
the maintenance sweep), ``get_task``, ``list_tasks``, ``stats``, the workers listing, the
API's ``/metrics`` and the dashboard's data endpoints, and the CLI's ``status`` (in process).

Asserted each time: no exception and no 5xx; the damaged task ends dead-lettered with a
reason, or runs (or, damaged while finished, stays finished); every other task succeeds;
and no id leaves every index (each is listed under some status).

Examples are derandomized and use no example database, so CI runs the same cases each time;
``DAMAGE_EXAMPLES`` raises their number for a longer local hunt.
"""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from api_support import MakeClient, clear_conveyor_env, client_factory, require_modules
from conftest import (
    BACKENDS,
    delete_rabbitmq_queues,
    rabbitmq_url,
    redis_admin,
    require_backend_module,
    require_rabbitmq_server,
)
from conveyor import QueueManager, TaskStatus
from conveyor.backends import sqlite_path_from_url
from conveyor.cli import main
from conveyor.lifecycle import FINISHED_STATUSES
from helpers.private_redis import PrivateRedis

require_modules("fastapi", "httpx")

#: Examples per backend: about 90 s in all on a loaded 2-core machine. ``DAMAGE_EXAMPLES``
#: sets one number for all (read at import: the tests clear ``CONVEYOR_*`` variables).
EXAMPLES = {"sqlite": 150, "redis": 120, "rabbitmq-sqlite": 50, "rabbitmq-redis": 50}
EXAMPLES_OVERRIDE = int(os.environ.get("DAMAGE_EXAMPLES", "0"))
PROPERTIES = settings(
    max_examples=20,
    deadline=None,
    database=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure prints its case at once
    suppress_health_check=list(HealthCheck),
)
#: How long one example may take to drain (leases of 1 s may have to run out first).
DRAIN_SECONDS = 15.0

# -- damaged values -------------------------------------------------------------------------

DEEP = "[" * 5000 + "]" * 5000
special_text = st.sampled_from(
    ["inf", "-inf", "nan", "NaN", "1e300", "-1e300", "1e400", "abc", "", " ", "-1", "0",
     "1.5", "9" * 40, "1e18", "0x10", DEEP, '{"a": NaN}', "[1, 2]", "5", '"text"', "null",
     '{"a":' * 300 + "1" + "}" * 300, "not json{", "\x00\x1b[2J", "processing", "success",
     "pending", "bogus"]
)  # fmt: skip
special_bytes = st.sampled_from([b"\xff\xfe", b"\xc3\x28", b'{"a": "\xff"}', b"\x80abc"])
numbers = st.sampled_from([float("inf"), float("-inf"), 1e300, -1e300, 2**63, -(2**63) - 1, -5])
values: st.SearchStrategy[Any] = (
    special_text | special_bytes | numbers | st.text(max_size=12) | st.binary(max_size=8)
)

# The stored fields of a task, by backend.
REDIS_FIELDS = [
    "id", "queue", "type", "priority", "data", "status", "attempts", "expiries", "max_retries",
    "retry_backoff", "queue_timeout", "process_timeout", "created_at", "scheduled_for",
    "started_at", "finished_at", "updated_at", "progress", "progress_message", "result", "error",
    "dead_reason", "cancel_requested", "history", "steps", "worker", "expire_at", "token",
    "score", "seq", "ready_at", "ticket", "copy",
]  # fmt: skip
#: Not ``queue``: a row given another queue's name is that queue's task, not damage.
SQLITE_COLUMNS = [f for f in REDIS_FIELDS if f not in ("score", "queue")] + [
    "lease_until",
    "publish_by",
]
INDEXES = ("pending", "delayed", "leases", "done:success", "done:failed", "pulled", "expiring",
           "publishing")  # fmt: skip
MEMBERS = st.sampled_from([b"\xff\xfe", "ghost", "", b"\x00"])
SCORES = st.sampled_from([float("inf"), float("-inf"), 1e300, -1e300, 0.0, 1.0])


@dataclass(frozen=True)
class Damage:
    """One damaged value: ``kind`` says where it goes, ``field`` which one."""

    kind: str  # field, unset, key_type, no_key, index_score, index_member, sql, sql_literal
    field: str = ""
    value: Any = None

    def __repr__(self) -> str:
        shown = repr(self.value)
        return f"Damage({self.kind}, {self.field}, {shown[:60]})"


def redis_damage() -> st.SearchStrategy[Damage]:
    fields = st.sampled_from(REDIS_FIELDS)
    return st.one_of(
        st.builds(Damage, st.just("field"), fields, values),
        st.builds(Damage, st.just("field"), fields, values),
        st.builds(Damage, st.just("unset"), fields),
        st.builds(Damage, st.just("key_type"), st.sampled_from(["string", "list", "set", "zset"])),
        st.builds(Damage, st.just("no_key")),
        st.builds(Damage, st.just("index_score"), st.sampled_from(INDEXES), SCORES),
        st.builds(Damage, st.just("index_member"), st.sampled_from(INDEXES), MEMBERS),
    )


SQL_LITERALS = ["CAST(X'FFFE' AS TEXT)", "X'00FF'", "1e999", "-1e999", "NULL",
                "9223372036854775807", "CAST(X'7B2261223A2022FF227D' AS TEXT)"]  # fmt: skip


def sqlite_damage() -> st.SearchStrategy[Damage]:
    columns = st.sampled_from([c for c in SQLITE_COLUMNS if c != "id"])
    return st.one_of(
        st.builds(Damage, st.just("sql"), columns, values),
        st.builds(Damage, st.just("sql"), columns, values),
        # An id that is not text (or not UTF-8): the row is found again by its rowid. (An id
        # made another text is a rename, not damage.)
        st.builds(Damage, st.just("sql_literal"), columns, st.sampled_from(SQL_LITERALS)),
        st.builds(
            Damage,
            st.just("sql_literal"),
            st.just("id"),
            st.sampled_from(["CAST(X'FFFE' AS TEXT)", "X'00FF'", "NULL"]),
        ),
    )


# -- writing the damage ---------------------------------------------------------------------


def as_sqlite(value: Any) -> Any:
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return str(value)  # sqlite3 cannot bind it: a hand-made edit would store text
    return value


def write_sqlite(path: str, queue: str, task_id: str, damage: Damage) -> int:
    """Write the damage; return the row's rowid (to find it again when its id is damaged)."""
    with closing(sqlite3.connect(path, timeout=30)) as db, db:
        where = "WHERE queue = ? AND id = ?"
        (rowid,) = db.execute(f"SELECT rowid FROM tasks {where}", (queue, task_id)).fetchone()
        if damage.kind == "sql_literal":
            db.execute(f"UPDATE tasks SET {damage.field} = {damage.value} {where}",
                       (queue, task_id))  # fmt: skip
        else:
            db.execute(f"UPDATE tasks SET {damage.field} = ? {where}",
                       (as_sqlite(damage.value), queue, task_id))  # fmt: skip
    return int(rowid)


def sqlite_row(path: str, rowid: int) -> tuple[Any, Any]:
    """The row's status and reason; ``("gone", None)`` once retention deleted it."""
    with closing(sqlite3.connect(path, timeout=30)) as db:
        row = db.execute(
            "SELECT status, dead_reason FROM tasks WHERE rowid = ?", (rowid,)
        ).fetchone()
    return ("gone", None) if row is None else (row[0], row[1])


def write_redis(url: str, queue: str, task_id: str, damage: Damage) -> str | bytes | None:
    """Write the damage; return a garbage index member it added (to find it later)."""
    client = redis_admin(url, decode=False)
    tag = f"conveyor:{{{queue}}}"
    key = f"{tag}:task:{task_id}"
    try:
        if damage.kind == "field":
            value = damage.value
            client.hset(key, damage.field, str(value) if isinstance(value, float | int) else value)
        elif damage.kind == "unset":
            client.hdel(key, damage.field)
        elif damage.kind == "key_type":
            client.delete(key)
            {"string": lambda: client.set(key, "junk"), "list": lambda: client.rpush(key, "a"),
             "set": lambda: client.sadd(key, "a"),
             "zset": lambda: client.zadd(key, {"a": 1})}[damage.field]()  # fmt: skip
        elif damage.kind == "no_key":
            client.delete(key)
        elif damage.kind == "index_score":
            client.zadd(f"{tag}:{damage.field}", {task_id: damage.value})
        elif damage.kind == "index_member":
            client.zadd(f"{tag}:{damage.field}", {damage.value: -(10 * 2**40)})
            return damage.value  # type: ignore[no-any-return]
        return None
    finally:
        client.close()


def live_in_redis(url: str, queue: str, members: list[Any]) -> list[str]:
    """The indexes a claim serves (ready, scheduled, leased) that hold one of ``members``."""
    client = redis_admin(url, decode=False)
    with closing(client):
        return [
            index
            for index in ("pending", "delayed", "leases")
            for member in members
            if member is not None
            and client.zscore(f"conveyor:{{{queue}}}:{index}", member) is not None
        ]


def redis_finished(url: str, queue: str) -> bool:
    """The victim's record says finished (a stale entry in another index, say a far future
    score, is left alone), or no claim serves its id."""
    client = redis_admin(url, decode=False)
    key = f"conveyor:{{{queue}}}:task:victim"
    with closing(client):
        status = client.hget(key, "status") if client.type(key) == b"hash" else None
    finished = {status.value.encode() for status in FINISHED_STATUSES}
    return status in finished or not live_in_redis(url, queue, ["victim"])


# -- the backends ---------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    url: str
    store: str  # "sqlite" or "redis": where the records are

    def damages(self) -> st.SearchStrategy[Damage]:
        return sqlite_damage() if self.store == "sqlite" else redis_damage()

    def store_url(self) -> str:
        if self.url.startswith("amqp"):
            return self.url.split("task_store=", 1)[1]
        return self.url


BACKEND_NAMES = {
    "sqlite": "sqlite",
    "redis": "redis",
    "rabbitmq-sqlite": "rabbitmq",
    "rabbitmq-redis": "rabbitmq",
}


@pytest.fixture(
    params=[pytest.param(name, marks=BACKENDS[BACKEND_NAMES[name]]) for name in BACKEND_NAMES]
)
def backend(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    private_redis: Callable[..., PrivateRedis],
) -> Backend:
    """The backend; Redis is a private server, so the stats and metrics of every queue are
    this test's alone (fast, and no damage can reach another test)."""
    name = str(request.param)
    require_backend_module(BACKEND_NAMES[name])
    if name == "sqlite":
        return Backend(name, f"sqlite:///{tmp_path}/q.db", "sqlite")
    redis_url = private_redis().url if "redis" in name else ""
    if name == "redis":
        return Backend(name, redis_url, "redis")
    require_rabbitmq_server()
    store = f"sqlite:///{tmp_path}/store.db" if name == "rabbitmq-sqlite" else redis_url
    return Backend(name, rabbitmq_url(tmp_path, store), name.split("-", 1)[1])


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_conveyor_env(monkeypatch)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def make_client(backend: Backend) -> Iterator[MakeClient]:
    yield from client_factory(backend.url, "default")


# -- one example ----------------------------------------------------------------------------

#: Where the damaged task is when it is damaged: waiting, held by a consumer, dead-lettered
#: (then re-driven and canceled), or succeeded (its times feed the stats' mean run time).
STATES = ("pending", "held", "finished", "succeeded")


@contextlib.contextmanager
def queue_of(
    url: str, name: str, store_url: str
) -> Iterator[tuple[Callable[[], QueueManager], list[Any]]]:
    made: list[QueueManager] = []

    def make() -> QueueManager:
        manager = QueueManager.from_url(
            url, queue_name=name, visibility_timeout=1.0, max_deliveries=50
        )
        made.append(manager)
        return manager

    try:
        yield make, made
    finally:
        for manager in made:
            with contextlib.suppress(Exception):
                manager.clear()
            with contextlib.suppress(Exception):
                manager.close()
        if url.startswith("amqp"):
            delete_rabbitmq_queues(name)
        if "redis" in store_url:
            client = redis_admin(store_url, decode=False)
            with closing(client):
                keys = list(client.scan_iter(match=f"conveyor:{{{name}}}:*".encode()))
                if keys:
                    client.delete(*keys)


def quietly(call: Callable[[], Any]) -> tuple[Any, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = call()
    return result, out.getvalue(), err.getvalue()


def drain(queue: QueueManager, ids: set[str], victim_done: Callable[[], bool]) -> None:
    """Claim and ack until every task is finished or gone (or the deadline): a worker's loop."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline:
        queue.sweep()
        message = queue.reserve(timeout=0.2)
        while message is not None:
            _, message = queue.ack_and_reserve(message, {"ok": True})
        unfinished = [
            task_id
            for task_id in ids
            if (record := queue.get_task(task_id)) is not None
            and record.status not in FINISHED_STATUSES
        ]
        if not unfinished and victim_done():
            return
    raise AssertionError(f"not drained in {DRAIN_SECONDS} s: a task was left waiting")


def run_example(backend: Backend, client: Any, state: str, damage: Damage) -> None:
    name = f"d-{uuid.uuid4().hex[:8]}"
    with queue_of(backend.url, name, backend.store_url()) as (make, _):
        queue = make()
        others = {"a", "b", "c"}
        assert queue.push("victim", {"n": 0}, priority=5)
        for task_id in sorted(others):
            assert queue.push(task_id, {"n": task_id}, priority=3)
        held = None
        if state != "pending":
            holder = make()
            held = holder.reserve(timeout=10)
            assert held is not None and held.task_id == "victim"
            if state == "finished":
                assert holder.fail(held, reason="error", error="it broke")
                held = None
            elif state == "succeeded":
                assert holder.ack(held, {"ran": True})
                held = None

        # Shown with a failure (captured stderr), for the known cases and the drawn ones.
        print(f"case: {backend.name} {state} {damage!r}", file=sys.stderr)
        garbage, rowid = None, 0
        if backend.store == "sqlite":
            path = sqlite_path_from_url(backend.store_url())
            rowid = write_sqlite(path, name, "victim", damage)
        else:
            garbage = write_redis(backend.store_url(), name, "victim", damage)

        if held is not None:
            ok = holder.ack(held, {"done": True})
            if not ok:
                holder.close()  # RabbitMQ: its delivery goes back to the broker
        if state in ("finished", "succeeded"):
            queue.retry("victim")  # a re-drive of a damaged record
            queue.cancel("victim")
        check_reads(backend, client, queue, name, cli=backend.store == "sqlite")

        def victim_done() -> bool:
            """Read raw, not through the reads under test: nothing left that a claim serves."""
            if backend.store == "sqlite":
                return sqlite_row(path, rowid)[0] in {*FINISHED_STATUSES, "gone"}
            return redis_finished(backend.store_url(), name) and not live_in_redis(
                backend.store_url(), name, [garbage]
            )

        drain(queue, {"victim", *others}, victim_done)
        check_reads(backend, client, queue, name)

        for task_id in sorted(others):
            record = queue.get_task(task_id)
            assert record is not None, task_id
            assert record.status == TaskStatus.SUCCESS, (task_id, record.status, record.error)
        victim = queue.get_task("victim")
        ids = {*others}
        if backend.store == "sqlite" and damage.field == "id":
            status, reason = sqlite_row(path, rowid)  # no id to find it by: its rowid
            assert status in FINISHED_STATUSES, status
            assert status != TaskStatus.FAILED or reason, reason
        elif victim is not None or (
            damage.kind not in ("no_key", "key_type") and damage.field != "finished_at"
        ):  # (a finished_at in the past lets retention delete a finished record)
            # A record that survives is finished; a failed one says why.
            assert victim is not None
            assert victim.status in FINISHED_STATUSES, (victim.status, victim.damage)
            shown_failed = any(line.startswith("status:") for line in victim.damage)
            if victim.status == TaskStatus.FAILED and damage.field != "dead_reason":
                assert victim.dead_reason or shown_failed, victim
            # A finished task's place in its done index is its retention clock: a score
            # damaged into the past lets the sweep trim the entry as expired.
            retention = (
                damage.kind == "index_score" and damage.field.startswith("done:")
            ) or damage.field == "finished_at"
            if victim.id == "victim" and not retention:
                ids.add("victim")
        listed = {
            status: {record.id for record in queue.list_tasks(status=status.value, limit=1000)}
            for status in TaskStatus
        }
        for task_id in ids:
            assert any(task_id in found for found in listed.values()), (task_id, listed)
        if garbage is not None:  # garbage is left only where nothing claims it
            assert not live_in_redis(backend.store_url(), name, [garbage])


def check_reads(
    backend: Backend, client: Any, queue: QueueManager, name: str, *, cli: bool = True
) -> None:
    """Every read: no exception, no 5xx, the CLI exits 0."""
    queue.get_task("victim")
    queue.list_tasks(limit=1000)
    for status in TaskStatus:
        queue.list_tasks(status=status.value, limit=1000)
    queue.stats()
    queue.workers()
    for path in ("/api/v1/tasks/victim", "/api/v1/tasks", "/api/v1/stats", "/api/v1/workers",
                 "/api/v1/tasks?status=failed", "/api/v1/tasks?status=pending"):  # fmt: skip
        sep = "&" if "?" in path else "?"
        answer = client.get(f"{path}{sep}queue={name}")
        assert answer.status_code < 500, (path, answer.status_code, answer.text[:300])
    for path in ("/metrics", "/api/v1/stats"):
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
    if not cli:
        return
    where = ["--url", backend.url, "--queue", name]
    for argv in (["status", *where], ["task", "show", "victim", *where], ["dead", "list", *where]):
        code, _, err = quietly(lambda argv=argv: main(argv))
        assert code in (0, 1) and "unexpected" not in err, (argv, code, err)
        if argv[0] == "status":
            assert code == 0, err


#: Cases the random search found once (each broke a backend before its fix): run first on
#: every backend with that store, so a regression fails at once whatever the search draws.
KNOWN = {
    "redis": [
        ("finished", Damage("field", "priority", "nan")),  # a NaN score failed ZADD halfway
        ("held", Damage("field", "status", "bogus")),  # an unknown status in the leases
        ("pending", Damage("index_score", "delayed", 1e300)),  # a stale second index entry
        ("held", Damage("key_type", "string")),  # the record is not a hash any more
        ("pending", Damage("field", "ticket", "abc")),  # matches no message (broker mode)
        ("pending", Damage("index_member", "leases", "ghost")),
    ],
    "sqlite": [
        ("held", Damage("sql", "attempts", b"\xc3(")),  # json_object failed on a blob
        ("pending", Damage("sql", "status", "bogus")),  # a status no index serves
        ("pending", Damage("sql_literal", "id", "NULL")),
        ("pending", Damage("sql_literal", "id", "CAST(X'FFFE' AS TEXT)")),
        ("pending", Damage("sql", "ticket", "abc")),  # matches no message (broker mode)
    ],
}


@pytest.mark.timeout(900)
def test_random_damage_in_storage_never_crashes_or_loses_a_task(
    backend: Backend, make_client: MakeClient
) -> None:
    client = make_client()

    for state, damage in KNOWN[backend.store]:
        run_example(backend, client, state, damage)
    examples = EXAMPLES_OVERRIDE or EXAMPLES[backend.name]

    @settings(PROPERTIES, max_examples=examples)
    @given(state=st.sampled_from(STATES), damage=backend.damages())
    def example(state: str, damage: Damage) -> None:
        run_example(backend, client, state, damage)

    example()


# -- readers create nothing -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["status"], ["queues"], ["workers"], ["task", "show", "x"], ["dead", "list"]],
    ids="-".join,
)
def test_a_reader_never_creates_a_sqlite_file_or_its_directory(
    argv: list[str], tmp_path: Path
) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "q.db"
    code, _, err = quietly(lambda: main([*argv, "--url", f"sqlite:///{missing}"]))
    assert code == 2, err
    assert "no SQLite database at" in err and "unexpected" not in err
    assert not (tmp_path / "no").exists()
    # A writer still creates both.
    queue = QueueManager.from_url(f"sqlite:///{missing}")
    queue.close()
    assert missing.exists()
