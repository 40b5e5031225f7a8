"""The SQLite backend on its own: ordering, leases, fencing, damage and many processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.backends.base import Claimed, NewTask
from conveyor.errors import BackendError, BrokerUnavailableError
from helpers.primitive_store import PrimitiveStore

QUEUE = "jobs"


def SqliteBackend(path: str, queue: str, **options: Any) -> PrimitiveStore:  # noqa: N802
    """The SQLite store of one queue, one primitive per call."""
    return PrimitiveStore(f"sqlite:///{os.path.abspath(path)}", queue, **options)


def task(task_id: str, priority: int = 5, **options: Any) -> NewTask:
    data = json.dumps({"id": task_id})
    return NewTask(task_id=task_id, priority=priority, data_json=data, **options)


def poll(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.002)


def claim(backend: PrimitiveStore, lease: float | None = 30.0, max_deliveries: int = 5) -> Claimed:
    claimed = backend.claim(lease, max_deliveries).claimed
    assert claimed is not None
    return claimed


def events(backend: PrimitiveStore, task_id: str) -> list[str]:
    row = backend.get(task_id)
    assert row is not None
    return [json.loads(line)["event"] for line in row["history"].splitlines()]


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "sub" / "queue.db")


@pytest.fixture
def backend(db_path: str) -> Iterator[PrimitiveStore]:
    opened = SqliteBackend(db_path, QUEUE)
    yield opened
    opened.close()


# -- order ------------------------------------------------------------------------------------


def test_highest_priority_first_and_fifo_within_a_priority(backend: PrimitiveStore) -> None:
    rng = random.Random(7)
    tasks = [task(f"t{i}", rng.randint(0, 10)) for i in range(1000)]
    # Half in one batch (one timestamp for all), half pushed one by one.
    assert backend.enqueue(tasks[:500]) == [True] * 500
    for one in tasks[500:]:
        assert backend.enqueue([one]) == [True]
    expected = [t.task_id for t in sorted(tasks, key=lambda t: -t.priority)]  # sort is stable
    assert [row["id"] for row in backend.list("pending", 2000, 0)] == expected
    assert [claim(backend).task_id for _ in tasks] == expected
    assert backend.claim(30, 5).claimed is None


def test_claim_returns_stored_values(backend: PrimitiveStore) -> None:
    backend.enqueue([task("a", 3, type="meeting", max_retries=2, retry_backoff=1.5)])
    claimed = claim(backend)
    assert (claimed.task_id, claimed.priority, claimed.attempts) == ("a", 3, 1)
    assert json.loads(claimed.data_json) == {"id": "a"}
    assert (claimed.type, claimed.max_retries, claimed.retry_backoff) == ("meeting", 2, 1.5)
    row = backend.get("a")
    assert row is not None
    assert (row["status"], row["attempts"]) == ("processing", 1) and row["started_at"]
    assert events(backend, "a") == ["pushed", "started"]


def test_delayed_task_is_invisible_until_due(backend: PrimitiveStore) -> None:
    backend.enqueue([task("later", 9, delay=0.3)])
    result = backend.claim(30, 5)
    assert result.claimed is None
    assert result.wait_hint is not None and 0 < result.wait_hint <= 0.3
    assert backend.counts()["scheduled"] == 1 and backend.size() == 0
    backend.enqueue([task("now", 1)])
    assert claim(backend).task_id == "now"  # the delayed one is not ready yet
    claimed = poll(lambda: backend.claim(30, 5).claimed)
    assert claimed.task_id == "later"
    assert events(backend, "later") == ["scheduled", "due", "started"]


def test_delayed_task_takes_its_due_time_as_place_in_line(backend: PrimitiveStore) -> None:
    backend.enqueue([task("delayed", 5, delay=0.05)])
    row = backend.get("delayed")
    assert row is not None
    poll(lambda: time.time() > row["scheduled_for"])
    backend.enqueue([task("pushed-after-due", 5)])
    assert [claim(backend).task_id for _ in range(2)] == ["delayed", "pushed-after-due"]


# -- leases -----------------------------------------------------------------------------------


def test_expired_lease_is_redelivered_at_its_original_place(backend: PrimitiveStore) -> None:
    backend.enqueue([task("first"), task("second")])
    first = claim(backend, lease=0.05)
    result = backend.claim(30, 5)
    assert result.claimed is not None and result.claimed.task_id == "second"
    backend.enqueue([task("third")])
    started = backend.get("first")
    assert started is not None
    poll(lambda: time.time() > started["started_at"] + 0.05)  # its lease ran out
    again = claim(backend)
    assert again.task_id == "first" and again.attempts == 2 and again.token != first.token
    row = backend.get("first")
    assert row is not None and row["expiries"] == 1
    assert events(backend, "first") == ["pushed", "started", "lease_expired", "started"]
    assert claim(backend).task_id == "third"


def test_wait_hint_names_the_next_lease_expiry(backend: PrimitiveStore) -> None:
    backend.enqueue([task("a")])
    claim(backend, lease=5.0)
    hint = backend.claim(30, 5).wait_hint
    assert hint is not None and 4 < hint <= 5


def test_poison_after_max_deliveries_expiries(backend: PrimitiveStore) -> None:
    backend.enqueue([task("poison")])
    for _ in range(3):
        assert poll(lambda: backend.claim(0.01, 3).claimed).task_id == "poison"
    backend.enqueue([task("good", 0)])
    assert poll(lambda: backend.claim(30, 3).claimed).task_id == "good"

    def dead() -> dict[str, Any] | None:
        backend.claim(30, 3)  # reaps the expired lease
        row = backend.get("poison")
        return row if row is not None and row["status"] == "failed" else None

    row = poll(dead)
    assert (row["dead_reason"], row["expiries"], row["attempts"]) == ("poison", 3, 3)
    error = json.loads(row["error"])
    assert error["type"] == "PoisonTask" and "delivered 3 times" in error["message"]
    assert row["finished_at"] is not None
    assert events(backend, "poison")[-1] == "dead_lettered"


def test_pull_without_lease_is_never_redelivered(backend: PrimitiveStore) -> None:
    backend.enqueue([task("once")])
    claimed = claim(backend, lease=None)
    result = backend.claim(0.01, 1)
    assert result.claimed is None and result.wait_hint is None
    assert backend.extend("once", claimed.token, 10)  # nothing to renew, still owned
    row = backend.get("once")
    assert row is not None and row["status"] == "processing"


def test_old_token_cannot_settle_after_a_reclaim(backend: PrimitiveStore) -> None:
    backend.enqueue([task("a")])
    old = claim(backend, lease=0.01)
    new = poll(lambda: backend.claim(30, 5).claimed)
    assert new.token != old.token
    assert not backend.ack("a", old.token, '"stale"')
    assert not backend.nack("a", old.token, 0, None, True)
    assert not backend.extend("a", old.token, 30)
    assert not backend.set_progress("a", old.token, 0.5, "stale")
    assert not backend.fail("a", old.token, "error", None)
    assert backend.set_progress("a", new.token, 0.5, "halfway")
    assert backend.extend("a", new.token, 30)
    assert backend.ack("a", new.token, '{"ok": true}')
    assert not backend.ack("a", new.token, None)  # settled once only
    row = backend.get("a")
    assert row is not None
    assert (row["status"], row["result"], row["progress"]) == ("success", '{"ok": true}', 1.0)
    # Success clears the last step's note: "halfway" next to progress 1.0 would mislead.
    assert row["progress_message"] is None and events(backend, "a")[-1] == "succeeded"


# -- settling ---------------------------------------------------------------------------------


def test_nack_goes_to_the_back_of_its_band(backend: PrimitiveStore) -> None:
    backend.enqueue([task("a"), task("b"), task("low", 1)])
    a = claim(backend)
    assert backend.nack("a", a.token, 0, '{"type": "E", "message": "m"}', True)
    assert [claim(backend).task_id for _ in range(3)] == ["b", "a", "low"]
    row = backend.get("a")
    assert row is not None and row["attempts"] == 2 and json.loads(row["error"])["type"] == "E"
    assert events(backend, "a") == ["pushed", "started", "retrying", "started"]


def test_nack_with_delay_and_hand_back(backend: PrimitiveStore) -> None:
    backend.enqueue([task("a")])
    first = claim(backend)
    assert backend.nack("a", first.token, 60, None, True)
    row = backend.get("a")
    assert row is not None and row["status"] == "scheduled" and row["scheduled_for"] > time.time()
    assert backend.claim(30, 5).claimed is None
    backend.enqueue([task("b")])
    second = claim(backend)
    assert backend.nack("b", second.token, 0, None, count_attempt=False)
    assert claim(backend).attempts == 1  # the handed-back delivery was not counted
    assert events(backend, "b") == ["pushed", "started", "interrupted", "started"]
    assert events(backend, "a")[-1] == "retrying"


def test_fail_with_and_without_token(backend: PrimitiveStore) -> None:
    backend.enqueue([task("a"), task("b")])
    a = claim(backend)
    assert backend.fail("a", a.token, "error", '{"type": "E", "message": "boom"}')
    assert backend.fail("b", None, "malformed", None)  # whatever its state
    assert not backend.fail("missing", None, "malformed", None)
    for task_id, reason in (("a", "error"), ("b", "malformed")):
        row = backend.get(task_id)
        assert row is not None and (row["status"], row["dead_reason"]) == ("failed", reason)
    assert [row["id"] for row in backend.list("failed", 10, 0)] == ["b", "a"]


def test_cancel_and_retry(backend: PrimitiveStore) -> None:
    backend.enqueue([task("waiting"), task("running", 9), task("later", delay=60)])
    running = claim(backend)
    assert backend.cancel("waiting") and backend.cancel("later")
    assert backend.cancel("running")
    row = backend.get("running")
    assert row is not None and row["status"] == "processing" and row["cancel_requested"] == 1
    assert not backend.cancel("missing")
    assert backend.ack("running", running.token, None)
    assert not backend.cancel("running")  # finished
    assert not backend.retry("running")  # success is not re-driven
    assert backend.counts()["canceled"] == 2
    assert backend.retry("waiting")
    again = claim(backend)
    assert again.task_id == "waiting" and again.attempts == 1
    assert events(backend, "waiting") == ["pushed", "canceled", "redriven", "started"]


def test_queue_timeout_marks_tasks_not_started_in_time(backend: PrimitiveStore) -> None:
    backend.enqueue([task("stale", 9, queue_timeout=0.01), task("fresh", 1)])
    row = backend.get("stale")
    assert row is not None
    poll(lambda: time.time() > row["created_at"] + 0.02)
    assert claim(backend).task_id == "fresh"
    stale = backend.get("stale")
    assert stale is not None and stale["status"] == "timeout" and stale["finished_at"]


# -- pushing ----------------------------------------------------------------------------------


def test_duplicate_ids(backend: PrimitiveStore) -> None:
    assert backend.enqueue([task("a"), task("a"), task("b")]) == [True, False, True]
    assert backend.enqueue([task("a", 9)]) == [False]
    row = backend.get("a")
    assert row is not None and row["priority"] == 5  # untouched
    claimed = claim(backend)
    assert backend.enqueue([task("a")]) == [False]  # processing is live too
    assert backend.ack("a", claimed.token, None)
    assert backend.enqueue([task("a", 2)]) == [True]  # finished: a fresh record
    fresh = backend.get("a")
    assert fresh is not None
    assert (fresh["status"], fresh["priority"], fresh["attempts"]) == ("pending", 2, 0)
    assert events(backend, "a") == ["pushed"]


def test_queues_in_one_file_are_separate(db_path: str) -> None:
    one, two = SqliteBackend(db_path, "one"), SqliteBackend(db_path, "two")
    one.enqueue([task("a")])
    assert two.enqueue([task("a")]) == [True]
    assert two.purge() == 1
    assert one.size() == 1 and two.size() == 0
    one.close()
    two.close()


def test_counts_recent_size_purge(backend: PrimitiveStore) -> None:
    backend.enqueue([task(f"t{i}") for i in range(4)] + [task("later", delay=60)])
    assert backend.ack("t0", claim(backend).token, None)
    assert backend.fail("t1", claim(backend).token, "error", None)
    claim(backend)
    counts = backend.counts()
    assert counts == {
        "scheduled": 1, "pending": 1, "processing": 1, "success": 1, "failed": 1,
        "canceled": 0, "timeout": 0,
    }  # fmt: skip
    done, failed, mean = backend.recent(60)
    assert (done, failed) == (1, 1) and mean is not None and mean >= 0
    assert backend.size() == 1
    assert backend.purge() == 1
    assert sum(backend.counts().values()) == 0
    backend.ping()


def test_list_all_puts_pending_first_in_claim_order(backend: PrimitiveStore) -> None:
    backend.enqueue([task("low", 1), task("high", 9), task("done", 10)])
    backend.ack("done", claim(backend).token, None)
    assert [row["id"] for row in backend.list(None, 10, 0)] == ["high", "low", "done"]
    assert [row["id"] for row in backend.list(None, 1, 1)] == ["low"]


def test_retention_deletes_old_successes_but_keeps_failures(db_path: str) -> None:
    backend = SqliteBackend(db_path, QUEUE, result_ttl=0.0)
    backend.enqueue([task("ok"), task("bad")])
    backend.ack("ok", claim(backend).token, None)
    backend.fail("bad", claim(backend).token, "error", None)
    sweeper = SqliteBackend(db_path, QUEUE, result_ttl=0.0)  # a fresh instance sweeps at once
    poll(lambda: sweeper.claim(30, 5) and backend.get("ok") is None)
    row = backend.get("bad")
    assert row is not None and row["status"] == "failed"
    backend.close()
    sweeper.close()


# -- damage and errors ------------------------------------------------------------------------


def test_corrupt_rows_do_not_stop_good_tasks(db_path: str, backend: PrimitiveStore) -> None:
    backend.enqueue([task(f"good{i}", 5) for i in range(3)])
    raw = sqlite3.connect(db_path)
    raw.executemany(
        "INSERT INTO tasks (queue, id, priority, data, status, attempts, history) "
        "VALUES (?, ?, ?, ?, 'pending', ?, NULL)",
        [
            (QUEUE, "garbage", "abc", "not json", "x"),
            (QUEUE, None, 9, "{}", None),
            (QUEUE, "badbytes", 9, b"\xff\xfe".decode("latin-1"), 0),
        ],
    )
    raw.execute("UPDATE tasks SET data = CAST(X'7b22ff7d' AS TEXT) WHERE id = 'badbytes'")
    raw.commit()
    raw.close()
    delivered = []
    while (claimed := backend.claim(30, 5).claimed) is not None:
        try:  # what the manager does with what it cannot parse
            json.loads(claimed.data_json)
            int(claimed.priority)
        except (TypeError, ValueError):
            assert backend.fail(claimed.task_id, None, "malformed", None)
            continue
        assert backend.ack(claimed.task_id, claimed.token, None)
        delivered.append(claimed.task_id)
    assert delivered == ["good0", "good1", "good2"]
    failed = {row["id"]: row["dead_reason"] for row in backend.list("failed", 10, 0)}
    assert failed == {"garbage": "malformed", None: "malformed", "badbytes": "malformed"}
    assert backend.counts()["failed"] == 3


def test_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BrokerUnavailableError, match="is a directory"):
        SqliteBackend(str(tmp_path), QUEUE)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(BrokerUnavailableError, match="locked"):
        SqliteBackend(str(locked / "sub" / "q.db"), QUEUE)
    with pytest.raises(BrokerUnavailableError, match="writable"):
        SqliteBackend(str(locked / "q.db"), QUEUE)


def test_file_that_is_not_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not a database, just text " * 100)
    with pytest.raises(BackendError, match="not a SQLite database"):
        SqliteBackend(str(path), QUEUE)


def test_closed_backend_raises_conveyor_errors(backend: PrimitiveStore) -> None:
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        backend.size()
    with pytest.raises(BrokerUnavailableError):
        backend.ping()


# -- waiting and many processes ---------------------------------------------------------------


def _push_later(path: str, task_id: str) -> None:
    SqliteBackend(path, QUEUE).enqueue([task(task_id)])


def test_wait_wakes_on_a_push_from_another_process(backend: PrimitiveStore, db_path: str) -> None:
    assert backend.claim(30, 5).claimed is None
    pusher = multiprocessing.get_context("spawn").Process(target=_push_later, args=(db_path, "x"))
    pusher.start()
    started = time.monotonic()

    def woken() -> Claimed | None:
        backend.wait(30)
        return backend.claim(30, 5).claimed

    poll(woken, timeout=60)
    assert time.monotonic() - started < 30  # woken by the push, not by the timeout
    pusher.join()


def test_wait_wakes_on_a_push_from_this_process(backend: PrimitiveStore, db_path: str) -> None:
    assert backend.claim(30, 5).claimed is None
    other = SqliteBackend(db_path, QUEUE)
    thread = threading.Thread(target=other.enqueue, args=([task("x")],))
    started = time.monotonic()
    thread.start()
    backend.wait(30)
    assert time.monotonic() - started < 30
    thread.join()
    assert claim(backend).task_id == "x"
    other.close()


def _drain(path: str) -> list[str]:
    backend = SqliteBackend(path, QUEUE)
    taken: list[str] = []
    while True:
        result = backend.claim(30, 5)
        if result.claimed is None:
            if backend.size() == 0:
                return taken
            continue
        taken.append(result.claimed.task_id)
        assert backend.ack(result.claimed.task_id, result.claimed.token, None)


@pytest.mark.slow
def test_four_processes_each_task_delivered_exactly_once(db_path: str) -> None:
    setup = SqliteBackend(db_path, QUEUE)
    ids = [f"t{i}" for i in range(2000)]
    assert all(setup.enqueue([task(task_id) for task_id in ids]))
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_drain, [db_path] * 4)
    delivered = [task_id for taken in results for task_id in taken]
    assert len(delivered) == len(set(delivered)) == 2000
    assert set(delivered) == set(ids)
    assert setup.counts()["success"] == 2000
    setup.close()


def _open_and_push(path: str, worker: int) -> None:
    backend = SqliteBackend(path, QUEUE)
    backend.enqueue([task(f"w{worker}-{i}") for i in range(50)])


def test_processes_opening_a_fresh_file_at_once(db_path: str) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_open_and_push, args=(db_path, n)) for n in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert SqliteBackend(db_path, QUEUE).size() == 200


def test_a_readable_interrupt_fd_ends_a_blocking_reserve_within_a_poll(tmp_path: Path) -> None:
    """A worker sets its signal pipe as the manager's ``interrupt_fd``: a blocking reserve
    polls it with the database (every 5 ms) and returns None, instead of waiting for its
    one-second slice (or, without it, for the whole block)."""
    from conveyor import QueueManager

    manager = QueueManager.from_url(f"sqlite:///{tmp_path}/q.db", queue_name=QUEUE)
    read_end, write_end = os.pipe()
    try:
        manager.interrupt_fd = read_end
        started = time.monotonic()
        assert manager.reserve(timeout=0.3) is None
        assert time.monotonic() - started >= 0.3, "nothing was written: the block runs out"
        os.write(write_end, b"\0")
        started = time.monotonic()
        assert manager.reserve(timeout=30) is None
        took = time.monotonic() - started
        assert took < 0.5, f"the reserve went on for {took:.2f}s after the pipe was written"
        assert manager.push("after", {}, 5)
        manager.interrupt_fd = None  # the caller empties it; here it is simply unset
        message = manager.reserve(timeout=5)
        assert message is not None and message.task_id == "after"
    finally:
        manager.close()
        os.close(read_end)
        os.close(write_end)
