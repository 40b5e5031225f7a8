"""Garbage written straight into a backend is dead-lettered; it never stops the queue.

Each case pushes good tasks, writes one bad entry by hand (raw ``sqlite3`` or the ``redis``
client) with the top priority so it is met first, pushes more good tasks, and then drains
the queue with ``reserve``: no exception, the good tasks in priority order, and the bad
entry in the dead-letter list (status ``failed`` with a ``dead_reason``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing

import pytest

from conftest import BACKENDS
from conveyor import QueueManager, TaskStatus
from conveyor.backends import sqlite_path_from_url

TOP_SCORE = -(10 * 2**40)  # a pending score ahead of every pushed task (priority 10, seq 0)

Inject = Callable[[QueueManager, str], str | None]


def sqlite_update(queue: QueueManager, url: str, assignment: str) -> None:
    """Push ``bad`` at the top priority, then damage its row with raw SQL."""
    assert queue.push("bad", {"fine": "until now"}, priority=10)
    path = sqlite_path_from_url(url)
    with closing(sqlite3.connect(path, timeout=10)) as db, db:
        changed = db.execute(
            f"UPDATE tasks SET {assignment} WHERE queue = ? AND id = 'bad'",
            (queue.queue_name,),
        ).rowcount
    assert changed == 1


def redis_client(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url)


def redis_key(queue: QueueManager, suffix: str) -> str:
    return f"conveyor:{{{queue.queue_name}}}:{suffix}"


def redis_hset(queue: QueueManager, url: str, field: str, value: str) -> None:
    assert queue.push("bad", {"fine": "until now"}, priority=10)
    with closing(redis_client(url)) as client:
        assert client.exists(redis_key(queue, "task:bad")) == 1
        client.hset(redis_key(queue, "task:bad"), field, value)


def redis_pending_only(queue: QueueManager, url: str, member: str | bytes) -> None:
    with closing(redis_client(url)) as client:
        assert client.zadd(redis_key(queue, "pending"), {member: TOP_SCORE}) == 1


def redis_not_a_hash(queue: QueueManager, url: str) -> None:
    assert queue.push("bad", {"fine": "until now"}, priority=10)
    with closing(redis_client(url)) as client:
        client.delete(redis_key(queue, "task:bad"))
        client.set(redis_key(queue, "task:bad"), "junk")


def inject(backend: str, case: str, queue: QueueManager, url: str) -> str | None:
    """Write the garbage; return the id its record should have (None if not a string)."""
    if backend == "sqlite":
        assignment = {
            "data-not-json": "data = 'not json{'",
            "priority-not-int": "priority = 'abc'",
            "data-not-utf8": "data = CAST(X'FFFE7B7D' AS TEXT)",
            "id-not-utf8": "id = CAST(X'FFFE' AS TEXT)",
            "id-null": "id = NULL",
        }[case]
        sqlite_update(queue, url, assignment)
        return None if case.startswith("id-") else "bad"
    if case == "data-not-json":
        redis_hset(queue, url, "data", "not json{")
    elif case == "priority-not-int":
        redis_hset(queue, url, "priority", "abc")
    elif case == "pending-id-without-record":
        redis_pending_only(queue, url, "ghost")
        return "ghost"
    elif case == "binary-member-without-record":
        redis_pending_only(queue, url, b"\xff\xfe")
        return None
    elif case == "record-not-a-hash":
        redis_not_a_hash(queue, url)
    else:
        raise AssertionError(case)
    return "bad"


CASES = [
    ("sqlite", "data-not-json", {"malformed"}),
    ("sqlite", "priority-not-int", {"malformed"}),
    ("sqlite", "data-not-utf8", {"malformed"}),
    ("sqlite", "id-not-utf8", {"malformed"}),
    ("sqlite", "id-null", {"malformed"}),
    ("redis", "pending-id-without-record", {"missing"}),
    ("redis", "data-not-json", {"malformed"}),
    ("redis", "priority-not-int", {"malformed"}),
    ("redis", "binary-member-without-record", {"missing", "malformed"}),
    ("redis", "record-not-a-hash", {"missing", "malformed"}),
]


@pytest.mark.parametrize(
    ("backend_name", "case", "reasons"),
    [
        pytest.param(backend, case, reasons, id=f"{backend}-{case}", marks=BACKENDS[backend])
        for backend, case, reasons in CASES
    ],
)
def test_garbage_entry_is_dead_lettered_and_good_tasks_keep_flowing(
    queue: QueueManager, backend_url: str, backend_name: str, case: str, reasons: set[str]
) -> None:
    assert queue.push_many([("before-low", 1, 2), ("before-high", 2, 8)]) == [True, True]
    bad_id = inject(backend_name, case, queue, backend_url)
    assert queue.push_many([("after-mid", 3, 5), ("after-top", 4, 9)]) == [True, True]

    got = []
    for _ in range(10):
        message = queue.reserve(timeout=0.2)
        if message is None:
            break
        got.append(message.task_id)
        assert queue.ack(message) is True
    assert got == ["after-top", "before-high", "after-mid", "before-low"]
    assert queue.reserve(timeout=0) is None
    assert queue.get_queue_length() == 0

    failed = queue.list_tasks(status="failed")
    assert len(failed) == 1, [record.id for record in failed]
    dead = failed[0]
    assert dead.status == TaskStatus.FAILED
    assert dead.dead_reason in reasons
    if bad_id is not None:
        assert dead.id == bad_id
        record = queue.get_task(bad_id)
        assert record is not None
        assert record.status == TaskStatus.FAILED and record.dead_reason in reasons
    counts = queue.stats().counts
    assert counts["failed"] == 1 and counts["success"] == 4 and counts["processing"] == 0
    assert len(queue.list_tasks()) == 5


@pytest.mark.parametrize("backend_name", [pytest.param("redis", marks=BACKENDS["redis"])])
def test_clear_removes_garbage_members_too(queue: QueueManager, backend_url: str) -> None:
    redis_pending_only(queue, backend_url, b"\xff\xfe")
    redis_pending_only(queue, backend_url, "ghost")
    assert queue.push("good", 1)
    queue.clear()
    with closing(redis_client(backend_url)) as client:
        left = list(client.scan_iter(match=redis_key(queue, "*").encode()))
    assert left in ([], [redis_key(queue, "counters").encode()])  # counters never go down
    assert queue.reserve(timeout=0) is None


@pytest.mark.parametrize("backend_name", [pytest.param("redis", marks=BACKENDS["redis"])])
def test_a_finished_task_leaves_a_pulled_entry_that_damage_put_beside_its_lease(
    queue: QueueManager, backend_url: str
) -> None:
    """Processing indexes are cleared whole when a task leaves them: an id that damage
    put in both the leases and the pulled index (with a score no retention ever trims) is
    not counted or listed as processing once it finished."""
    assert queue.push("victim", 1)
    held = queue.reserve(timeout=0)
    assert held is not None and held.task_id == "victim"
    with closing(redis_client(backend_url)) as client:
        client.zadd(redis_key(queue, "pulled"), {"victim": float("inf")})
    assert queue.ack(held)
    with closing(redis_client(backend_url)) as client:
        assert client.zscore(redis_key(queue, "pulled"), "victim") is None
    assert queue.stats().counts.get("processing", 0) == 0
    assert [record.id for record in queue.list_tasks(status="processing")] == []
