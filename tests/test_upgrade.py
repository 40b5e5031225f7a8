"""Upgrade in place: a SQLite file or Redis keyspace written by an earlier Conveyor keeps working.

``tests/fixtures/upgrade`` holds what ``scripts/make_upgrade_fixtures.py`` wrote with the code
of the layout to stay compatible with (commit 08dcf55, the first layout): queue ``upgrade-q``
with pending tasks of mixed and equal priorities, delayed tasks (one due, one far away),
leases that ran out, a lease still held, a pulled task, checkpoints, a success, a dead letter,
a canceled task, queue timeouts and a worker heartbeat. Each fixture carries a manifest that
says what every task is and what ``get_task`` reported for it when it was written.

These tests load the files with the current code and go through the public API only, so a
storage change passes them by reading the old layout or by migrating it, never by luck.
They are the contract of the issue "an upgrade in place works": do not regenerate the
fixtures to make them pass; add a new generation beside the old one instead.

The Redis dump is restored into the test database under a fresh queue name (the text
``upgrade-q`` appears in the dump only as the queue name, so replacing it renames the queue,
its keys and its worker), so parallel runs never share keys. Worker heartbeats are
cross-queue state that other tests on that database prune and stop, so the registry test
restores the dump into a private redis-server instead.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import REDIS_URL, backend_params, require_redis_server, sleep_until
from conveyor import Message, QueueManager, TaskRecord, TaskStatus
from conveyor.lifecycle import LEGACY_EVENTS
from helpers.private_redis import PrivateRedis

FIXTURES = Path(__file__).parent / "fixtures" / "upgrade"
FIXTURE_QUEUE = "upgrade-q"
#: The fixture ages, and retention rightly deletes finished tasks older than result_ttl: the
#: test keeps them for a century so it sees what the fixture holds, whenever it runs.
CENTURY = 100 * 365 * 24 * 3600.0
#: Long enough that no lease taken by the test runs out during it, however slow the machine.
LEASE = 600.0
#: Tasks that were pending as written, in the order ``list_tasks("pending")`` shows them.
PENDING_AS_WRITTEN = [
    "p9-a", "p9-b", "p5-a", "p5-b", "p5-c", "q-expired", "r-nacked", "p1-a", "q-patient",
]  # fmt: skip
#: What a record reports for a field the manifest leaves out (the optional fields' defaults).
DEFAULTS = TaskRecord.model_construct().model_dump(mode="json")
#: Fields that the passage of time never changes: compared whatever the status.
IDENTITY = (
    "queue", "type", "priority", "data", "max_retries", "retry_backoff", "queue_timeout",
    "process_timeout", "created_at", "scheduled_for", "steps",
)  # fmt: skip
#: Stamps are compared to the millisecond: a layout may store them with less precision.
TIME_FIELDS = ("created_at", "scheduled_for", "started_at", "finished_at")


@dataclass
class Upgraded:
    """A fixture opened with the current code: the manager and what the fixture expects."""

    queue: QueueManager
    manifest: dict[str, Any]

    @property
    def tasks(self) -> dict[str, Any]:
        return dict(self.manifest["tasks"])

    def written(self, task_id: str) -> dict[str, Any]:
        """The record fields as written, defaults filled in."""
        return {**DEFAULTS, **self.tasks[task_id]["record"]}

    def held(self, task_id: str, *, leased: bool = True) -> Message:
        """The message a worker that lived through the upgrade still holds for this task."""
        written = self.written(task_id)
        token = self.tasks[task_id]["token"]
        assert token, f"the fixture holds no token for {task_id}"
        return Message(
            task_id=task_id, data=written["data"], priority=written["priority"],
            queue=self.queue.queue_name, token=token, leased=leased,
        )  # fmt: skip


# -- loading the fixtures -------------------------------------------------------------------


def open_sqlite_copy(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """Copy the fixture, read its manifest and drop the manifest table from the copy, so the
    code under test opens exactly what the old code wrote."""
    path = tmp_path / "v1.db"
    shutil.copyfile(FIXTURES / "v1.db", path)
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute("SELECT key, value FROM fixture_manifest").fetchall()
        with connection:
            connection.execute("DROP TABLE fixture_manifest")
    finally:
        connection.close()
    return path, {key: json.loads(value) for key, value in rows}


def redis_dump(queue_name: str) -> dict[str, Any]:
    """The Redis fixture with the queue (its keys, records and worker) renamed."""
    text = (FIXTURES / "v1-redis.json").read_text(encoding="utf-8")
    return dict(json.loads(text.replace(FIXTURE_QUEUE, queue_name)))


def restore(client: redis.Redis, keys: list[dict[str, Any]]) -> None:
    """Write dumped keys with plain commands; shared keys (the queue set) get members added."""
    pipe = client.pipeline(transaction=True)
    for entry in keys:
        key, kind, value = entry["key"], entry["type"], entry["value"]
        if kind == "string":
            pipe.set(key, value)
        elif kind == "hash":
            pipe.hset(key, mapping=value)
        elif kind == "zset":
            pipe.zadd(key, {member: score for member, score in value})
        elif kind == "set":
            pipe.sadd(key, *value)
        elif kind == "list":
            pipe.rpush(key, *value)
        else:
            raise AssertionError(f"{key}: the dump has a {kind}, which restore() cannot write")
        if entry["pttl_ms"] is not None:
            pipe.pexpire(key, entry["pttl_ms"])
    pipe.execute()


def forget_redis_queue(url: str, queue_name: str, worker_id: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"conveyor:{{{queue_name}}}:*", count=1000))
        keys += [f"conveyor:workers:{worker_id}", f"conveyor:workers:{worker_id}:stop"]
        client.delete(*keys)
        client.srem("conveyor:queues", queue_name)
        client.zrem("conveyor:workers", worker_id)
    except redis.RedisError:
        pass
    finally:
        client.close()


def settled(manifest: dict[str, Any]) -> dict[str, Any]:
    """Wait until the short leases, delays and queue timeouts the fixture set have run out
    (a no-op unless the fixture was written moments ago), and refuse a fixture too old."""
    assert manifest["format"] == "conveyor-upgrade-fixture/1", manifest["format"]
    sleep_until(float(manifest["valid_after"]))
    far = datetime.fromisoformat(manifest["tasks"]["d-future"]["record"]["scheduled_for"])
    if far.timestamp() - time.time() < 24 * 3600:
        pytest.fail(
            f"the fixture's far-delayed task d-future is due at {far}: the fixture is too old; "
            "make a new generation with scripts/make_upgrade_fixtures.py and keep this one"
        )
    return manifest


@pytest.fixture(params=backend_params("sqlite", "redis"))
def upgraded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Upgraded]:
    """The fixture of the backend under test, opened with today's code (Redis: in db 15)."""
    options: dict[str, Any] = {"visibility_timeout": LEASE, "result_ttl": CENTURY}
    if request.param == "sqlite":
        path, manifest = open_sqlite_copy(tmp_path)
        queue = QueueManager.from_url(f"sqlite:///{path}", queue_name=FIXTURE_QUEUE, **options)
        with contextlib.closing(queue):
            yield Upgraded(queue, settled(manifest))
        return
    require_redis_server()
    name = f"upg-{uuid.uuid4().hex[:10]}"
    dump = redis_dump(name)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        restore(client, [k for k in dump["keys"] if not k["key"].startswith("conveyor:workers")])
        queue = QueueManager.from_url(REDIS_URL, queue_name=name, **options)
        with contextlib.closing(queue):
            yield Upgraded(queue, settled(dump))
    finally:
        client.close()
        forget_redis_queue(REDIS_URL, name, dump["worker_id"])


# -- checks ---------------------------------------------------------------------------------


def same_fields(record: TaskRecord, expected: dict[str, Any], fields: Iterable[str]) -> list[str]:
    """The fields where ``record`` differs from ``expected`` (stamps within a millisecond)."""
    dumped = record.model_dump(mode="json")
    wrong = []
    for field in fields:
        got, want = dumped[field], expected[field]
        if field in TIME_FIELDS and got is not None and want is not None:
            gap = datetime.fromisoformat(got) - datetime.fromisoformat(want)
            if abs(gap.total_seconds()) <= 0.001:
                continue
        if got != want:
            wrong.append(f"{field}: {got!r}, written {want!r}")
    return wrong


def drain(queue: QueueManager) -> list[Message]:
    """Reserve until nothing is ready; the fixture holds 18 tasks, so 100 means a loop."""
    served: list[Message] = []
    for _ in range(100):
        message = queue.reserve(timeout=0)
        if message is None:
            return served
        served.append(message)
    raise AssertionError(f"more than 100 tasks came out: {[m.task_id for m in served][:30]}")


def status(queue: QueueManager, task_id: str) -> TaskStatus:
    return queue.require_task(task_id).status


def reserve_only(queue: QueueManager, task_id: str) -> Message:
    """Reserve when ``task_id`` is the one ready task; it must be the one that comes out."""
    message = queue.reserve(timeout=0)
    assert message is not None and message.task_id == task_id, (task_id, message)
    return message


# -- the tests ------------------------------------------------------------------------------


def test_every_task_reads_back_as_written(upgraded: Upgraded) -> None:
    queue = upgraded.queue
    for task_id, spec in upgraded.tasks.items():
        record = queue.require_task(task_id)
        expected = upgraded.written(task_id)
        allowed = {spec["status"], spec["after_time"]} - {None}
        assert record.status.value in allowed, (task_id, record.status, spec["role"])
        assert record.id == task_id and record.queue == queue.queue_name
        # Once time has acted on a task (a migration may do that early), only its identity
        # is as written; otherwise every field is.
        fields = [f for f in expected if f not in ("history", "updated_at")]
        if record.status.value != spec["status"]:
            fields = list(IDENTITY)
        assert same_fields(record, expected, fields) == [], task_id
        events = [event.event for event in record.history]
        # Earlier versions named some events differently; records read with today's names.
        written = [str(LEGACY_EVENTS.get(name, name)) for name in spec["history"]]
        assert events[: len(written)] == written, (task_id, events)

    listed = [record.id for record in queue.list_tasks(limit=1000)]
    assert sorted(listed) == sorted(upgraded.tasks), "list_tasks() shows each task once"
    for finished in ("success", "failed", "canceled"):
        want = sorted(i for i, spec in upgraded.tasks.items() if spec["status"] == finished)
        assert sorted(r.id for r in queue.list_tasks(finished)) == want, finished
    still_pending = [i for i in PENDING_AS_WRITTEN if status(queue, i) is TaskStatus.PENDING]
    pending = [r.id for r in queue.list_tasks(TaskStatus.PENDING, limit=1000)]
    assert [i for i in pending if i in PENDING_AS_WRITTEN] == still_pending

    stats = queue.stats()
    assert stats.queue == queue.queue_name
    assert sum(stats.counts.values()) == len(upgraded.tasks)
    assert (stats.counts["success"], stats.counts["failed"], stats.counts["canceled"]) == (1, 1, 1)
    # Counts are the stored indexes: a task past its queue_timeout that no sweep has written
    # yet is still counted pending, though readers already show it as timeout.
    expired = [i for i in PENDING_AS_WRITTEN if status(queue, i) is TaskStatus.TIMEOUT]
    assert queue.get_queue_length() == stats.counts["pending"] == len(pending) + len(expired)
    queue.sweep()  # also brings back the expired leases and the due task
    after = queue.list_tasks(TaskStatus.PENDING, limit=1000)
    assert queue.get_queue_length() == len(after) == len(pending) + 3
    assert queue.queue_name in queue.known_queues()
    # Live ids are still recognised as live: pushing them again is refused.
    for live in ("d-future", "l-held", "u-pulled", "p5-a", "r-nacked"):
        assert not queue.push(live, {"again": True}), live


def test_ready_tasks_come_out_once_in_priority_then_fifo_order(upgraded: Upgraded) -> None:
    """Expired leases come back at their place, the due task is served, the stale one times
    out, and tasks pushed after the upgrade queue behind the old ones of their priority."""
    queue = upgraded.queue
    assert queue.push("new-9", {"new": 9}, 9) and queue.push("new-5", {"new": 5}, 5)
    priorities = {i: upgraded.written(i)["priority"] for i in upgraded.tasks}
    priorities.update({"new-9": 9, "new-5": 5})
    expected = sorted([*upgraded.manifest["serve_order"], "new-9", "new-5"],
                      key=lambda task_id: -priorities[task_id])  # fmt: skip
    served = drain(queue)
    assert [m.task_id for m in served] == expected, "every ready task exactly once, in order"
    assert queue.reserve(timeout=0) is None

    for message in served:
        if message.task_id.startswith("new-"):
            continue
        written = upgraded.written(message.task_id)
        assert message.leased and message.queue == queue.queue_name
        assert message.data == written["data"], message.task_id
        assert message.priority == written["priority"]
        assert message.type == written["type"]
        assert message.max_retries == written["max_retries"]
        assert message.retry_backoff == written["retry_backoff"]
        assert message.process_timeout == written["process_timeout"]
        assert message.steps == written["steps"], message.task_id
        assert message.attempts == written["attempts"] + 1, message.task_id
        created = datetime.fromisoformat(written["created_at"]).timestamp()
        assert abs(message.created_at - created) <= 0.001
    by_id = {m.task_id: m for m in served}
    assert set(by_id["c-steps"].steps) == {"download", "transcribe"}
    assert by_id["r-nacked"].steps == {"download": {"bytes": 99, "path": "/data/r.wav"}}

    assert status(queue, "q-expired") is TaskStatus.TIMEOUT
    assert status(queue, "d-future") is TaskStatus.SCHEDULED
    for task_id in ("l-held", "u-pulled", *by_id):
        assert status(queue, task_id) is TaskStatus.PROCESSING, task_id
    assert "lease_expired" in [e.event for e in queue.require_task("l-lease").history]
    counts = queue.stats().counts
    assert counts == {
        "scheduled": 1, "pending": 0, "processing": len(served) + 2, "success": 1,
        "failed": 1, "canceled": 1, "timeout": 1,
    }  # fmt: skip
    # The worker that held l-lease before the upgrade lost it: its token is fenced off.
    assert not upgraded.queue.ack(upgraded.held("l-lease"))
    assert not upgraded.queue.ack(upgraded.held("c-steps"))


def test_ack_nack_fail_cancel_retry_work_on_upgraded_tasks(upgraded: Upgraded) -> None:
    queue = upgraded.queue
    served = {m.task_id: m for m in drain(queue)}
    assert set(served) == set(upgraded.manifest["serve_order"])

    # Workers that lived through the upgrade settle what they hold.
    held = upgraded.held("l-held")
    assert queue.extend(held, 60) and queue.set_progress(held, 0.9, "nearly")
    assert queue.ack(held, {"held": True})
    assert queue.require_task("l-held").result == {"held": True}
    assert queue.ack(upgraded.held("u-pulled", leased=False), "pulled result")
    assert queue.require_task("u-pulled").status is TaskStatus.SUCCESS

    # A checkpoint adds to the steps stored before the upgrade.
    steps = served.pop("c-steps")
    assert queue.checkpoint(steps, {**steps.steps, "summarize": "short"})
    assert queue.ack(steps, {"summary": "short"})
    assert set(queue.require_task("c-steps").steps) == {"download", "transcribe", "summarize"}

    # nack, then fail, then retry: the steps survive each, attempts restart at the retry.
    nacked = served.pop("r-nacked")
    assert queue.nack(nacked, error="again")
    assert status(queue, "r-nacked") is TaskStatus.PENDING
    again = reserve_only(queue, "r-nacked")
    assert again.attempts == nacked.attempts + 1
    assert queue.fail(again, error=ValueError("still broken"))
    record = queue.require_task("r-nacked")
    assert (record.status, record.dead_reason) == (TaskStatus.FAILED, "error")
    assert record.error is not None and record.error.type == "ValueError"
    assert queue.retry("r-nacked")
    retried = reserve_only(queue, "r-nacked")
    assert retried.attempts == 1 and retried.steps == nacked.steps
    assert queue.ack(retried)

    # Cancel while running: the hand-back ends it as canceled; a retry brings it back.
    running = served.pop("p5-b")
    assert queue.cancel("p5-b") and queue.require_task("p5-b").cancel_requested
    assert queue.nack(running)
    assert status(queue, "p5-b") is TaskStatus.CANCELED
    assert queue.retry("p5-b")
    assert queue.ack(reserve_only(queue, "p5-b"))

    # The finished tasks written by the old code: retry what may be retried.
    assert queue.retry("f-dead")
    revived = reserve_only(queue, "f-dead")
    assert revived.attempts == 1 and revived.data == upgraded.written("f-dead")["data"]
    assert queue.ack(revived)
    assert queue.retry("x-canceled")
    assert queue.ack(reserve_only(queue, "x-canceled"))
    assert not queue.retry("s-done") and not queue.cancel("s-done")
    assert queue.push("s-done", {"second": "life"}, 5)  # a finished id may be reused
    reused = reserve_only(queue, "s-done")
    assert reused.data == {"second": "life"} and reused.attempts == 1
    assert queue.ack(reused)

    # The far-delayed task: cancel, then retry makes it ready now.
    assert queue.cancel("d-future") and status(queue, "d-future") is TaskStatus.CANCELED
    assert queue.retry("d-future")
    assert queue.ack(reserve_only(queue, "d-future"))
    assert queue.delete_finished(TaskStatus.TIMEOUT) == 1
    assert queue.get_task("q-expired") is None

    first = served.pop("p9-a")
    assert queue.fail(first, reason="error", error="gave up")
    for message in served.values():
        assert queue.set_progress(message, 0.5) and queue.extend(message)
        assert queue.ack(message, {"done": message.task_id})
    assert queue.reserve(timeout=0) is None
    counts = queue.stats().counts
    assert counts["failed"] == 1 and counts["success"] == len(upgraded.tasks) - 2
    assert counts["pending"] == counts["processing"] == counts["scheduled"] == 0
    assert [r.id for r in queue.list_tasks(TaskStatus.FAILED)] == ["p9-a"]
    assert queue.stats().mean_run_seconds is not None


@pytest.mark.parametrize("backend", backend_params("sqlite", "redis"))
def test_worker_heartbeats_survive_the_upgrade(backend: str, tmp_path: Path) -> None:
    if backend == "sqlite":
        path, manifest = open_sqlite_copy(tmp_path)
        url, server = f"sqlite:///{path}", None
    else:
        server = PrivateRedis(tmp_path / "redis")
        manifest = redis_dump(f"upg-{uuid.uuid4().hex[:10]}")
        client = redis.Redis.from_url(server.url, decode_responses=True)
        with contextlib.closing(client):
            restore(client, manifest["keys"])
        url = server.url
    try:
        with QueueManager.from_url(url, queue_name=manifest["queue"]) as queue:
            worker_id, written = manifest["worker_id"], manifest["workers"]
            found = [w for w in queue.workers() if w["id"] == worker_id]
            assert [w.pop("damage") for w in found] == [[]]  # read whole, nothing damaged
            assert found == written
            assert queue.request_stop(worker_id) == 1
            info = {**written[0], "last_seen": time.time()}
            assert queue.register_worker(worker_id, info, ttl=60) is True  # asked to stop
            queue.unregister_worker(worker_id)
            assert [w for w in queue.workers() if w["id"] == worker_id] == []
    finally:
        if server is not None:
            server.stop()


def test_sqlite_review_dump_matches_the_fixture(tmp_path: Path) -> None:
    """``v1-sqlite.sql`` is the fixture as text for review: it must hold what v1.db holds.

    Compared by content, not text, so another SQLite version's formatting does not matter.
    """
    path = tmp_path / "v1.db"
    shutil.copyfile(FIXTURES / "v1.db", path)
    fixture, review = sqlite3.connect(path), sqlite3.connect(":memory:")
    try:
        review.executescript((FIXTURES / "v1-sqlite.sql").read_text(encoding="utf-8"))
        tables = "SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name"
        assert fixture.execute(tables).fetchall() == review.execute(tables).fetchall()
        for (name,) in fixture.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            query = f'SELECT * FROM "{name}" ORDER BY rowid'
            assert fixture.execute(query).fetchall() == review.execute(query).fetchall(), name
    finally:
        fixture.close()
        review.close()
