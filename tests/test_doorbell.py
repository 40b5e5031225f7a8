"""A worker with a busy slot and a free one waits for a push without claiming in a loop.

The worker waits on its children's pipes and on the queue's doorbell (a ``BLPOP`` sent on
a connection of its own, whose socket it selects on) at once. Each test has a private
Redis, so its command counts are its own and it may kill the server.
"""

from __future__ import annotations

import contextlib
import select
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import Helper, wait_until
from conveyor import QueueManager, TaskStatus
from conveyor.backends.redis.keys import QueueKeys
from helpers.pipelines import runs
from helpers.private_redis import PrivateRedis
from test_worker import StartWorker, Worker, wait_status, worker_factory

QUEUE = "bell"


@pytest.fixture
def server(private_redis: Callable[..., PrivateRedis]) -> PrivateRedis:
    return private_redis(aof=True)  # the queue survives the restart of the last test


@pytest.fixture
def queue(server: PrivateRedis) -> Iterator[QueueManager]:
    manager = QueueManager.from_url(server.url, queue_name=QUEUE)
    yield manager
    manager.close()


@pytest.fixture
def start_worker(
    queue: QueueManager, spawn_helper: Callable[..., Helper], server: PrivateRedis
) -> Iterator[StartWorker]:
    yield from worker_factory(spawn_helper, ["--url", server.url, "--queue", QUEUE])


def _calls(server: PrivateRedis) -> int:
    """Operations (FCALL) the server has run so far."""
    client = redis.Redis.from_url(server.url)
    try:
        return int(client.info("commandstats").get("cmdstat_fcall", {}).get("calls", 0))
    finally:
        client.close()


def hold_a_slot(queue: QueueManager, tmp_path: Path) -> None:
    """Push a gated task ("held") and wait until a slot runs it."""
    queue.push("held", {"dir": str(tmp_path)}, type="gate")
    wait_until(lambda: runs(tmp_path, "held", "gate_open"), 30, message="held to start")


def a_push_starts_beside_the_held_task(queue: QueueManager, worker: Worker, tmp_path: Path) -> None:
    """A task pushed now runs to success while "held" still runs; then "held" finishes."""
    queue.push("quick", {"dir": str(tmp_path), "seconds": 0}, type="sleepy")
    wait_status(queue, "quick", TaskStatus.SUCCESS, worker=worker)
    assert not runs(tmp_path, "held", "after_gate"), "quick had to wait for the busy slot"
    (tmp_path / "held.go").touch()
    wait_status(queue, "held", TaskStatus.SUCCESS, worker=worker)


def test_a_free_slot_waits_on_the_doorbell_not_in_a_claim_loop(
    queue: QueueManager, start_worker: StartWorker, server: PrivateRedis, tmp_path: Path
) -> None:
    worker = start_worker(concurrency=2, idle_block=0.5)
    hold_a_slot(queue, tmp_path)
    before = _calls(server)
    time.sleep(1.0)  # not a synchronisation: the window in which idle operations are counted
    idle = _calls(server) - before
    # Claiming every 50 ms would be ~20 operations in this second; the doorbell times out
    # every 0.5 s (idle_block), each followed by one claim.
    assert idle < 8, f"{idle} operations in one idle second: the free slot polls"
    a_push_starts_beside_the_held_task(queue, worker, tmp_path)


def test_a_server_restart_while_the_doorbell_waits_loses_nothing(
    queue: QueueManager, start_worker: StartWorker, server: PrivateRedis, tmp_path: Path
) -> None:
    worker = start_worker(concurrency=2, idle_block=0.5)
    hold_a_slot(queue, tmp_path)
    server.kill()  # the doorbell's BLPOP is outstanding: its socket reads EOF
    server.start()
    queue.push("after", {"dir": str(tmp_path), "seconds": 0}, type="sleepy")
    wait_status(queue, "after", TaskStatus.SUCCESS, worker=worker, timeout=60)
    (tmp_path / "held.go").touch()
    wait_status(queue, "held", TaskStatus.SUCCESS, worker=worker, timeout=60)
    assert worker.running()


def test_a_blocking_reserve_waits_on_the_outstanding_doorbell(
    queue: QueueManager, server: PrivateRedis
) -> None:
    """Redis hands a marker to the client that blocked first: a reserve that sent its own
    BLPOP behind the doorbell's would sleep through the push (for a whole wait slice)."""
    assert queue.doorbell(5.0) is not None
    before = _calls(server)
    got: list[Any] = []
    reserving = threading.Thread(target=lambda: got.append(queue.reserve(timeout=10)))
    reserving.start()
    wait_until(lambda: _calls(server) > before, 10, message="the reserve's first claim")
    pusher = QueueManager.from_url(server.url, queue_name=QUEUE)
    try:
        assert pusher.push("x", {}, 5)
    finally:
        pusher.close()
    reserving.join(15)
    assert got and got[0] is not None and got[0].task_id == "x"
    blpops = redis.Redis.from_url(server.url).info("commandstats")["cmdstat_blpop"]["calls"]
    assert blpops == 1, "the reserve sent a BLPOP of its own behind the doorbell's"


# -- PostgreSQL: the LISTEN thread rings a pipe ------------------------------------------------


@pytest.fixture
def pg_queue(postgres_url: str) -> Iterator[QueueManager]:
    manager = QueueManager.from_url(postgres_url, queue_name=f"bell-{uuid.uuid4().hex[:8]}")
    yield manager
    manager.clear()
    manager.close()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _quiet_bell(queue: QueueManager) -> tuple[int, Any]:
    """The queue's doorbell once its listener has connected (a connect rings every bell
    once), and the listener, to see what it has counted."""
    fd = queue.doorbell(5.0)
    assert fd is not None
    listener = queue._store._listener  # type: ignore[attr-defined]
    wait_until(lambda: listener.epoch > 0, 10, message="the listener to connect")
    queue.heard_doorbell()
    return fd, listener


@pytest.mark.postgres
def test_postgres_doorbell_rings_on_a_push_and_hushes_when_heard(
    pg_queue: QueueManager, postgres_url: str
) -> None:
    fd, _ = _quiet_bell(pg_queue)
    assert pg_queue.reserve(timeout=0) is None  # what a worker does before it waits
    assert pg_queue.doorbell(5.0) == fd and not _readable(fd)
    other = QueueManager.from_url(postgres_url, queue_name=pg_queue.queue_name)
    try:
        assert other.push("p1", {}, 5)
    finally:
        other.close()
    wait_until(lambda: _readable(fd), 10, message="the push to ring the doorbell")
    pg_queue.heard_doorbell()
    assert not _readable(fd)
    message = pg_queue.reserve(timeout=0)
    assert message is not None and message.task_id == "p1"


@pytest.mark.postgres
def test_postgres_push_between_claim_and_doorbell_is_not_missed(
    pg_queue: QueueManager, postgres_url: str
) -> None:
    fd, listener = _quiet_bell(pg_queue)
    assert pg_queue.reserve(timeout=0) is None  # the claim notes what the listener has seen
    other = QueueManager.from_url(postgres_url, queue_name=pg_queue.queue_name)
    try:
        assert other.push("p2", {}, 5)
    finally:
        other.close()
    wait_until(lambda: listener.mark(pg_queue.queue_name)[1] > 0, 10, message="the NOTIFY")
    pg_queue.heard_doorbell()  # as if the ring were taken before the worker asked again
    assert not _readable(fd)
    # Only the doorbell's own check (notified since the last claim?) can ring it now.
    assert pg_queue.doorbell(5.0) == fd and _readable(fd), "a push before the wait was missed"


@pytest.mark.postgres
def test_postgres_worker_with_a_busy_slot_starts_a_pushed_task(
    pg_queue: QueueManager,
    postgres_url: str,
    spawn_helper: Callable[..., Helper],
    tmp_path: Path,
) -> None:
    factory = worker_factory(spawn_helper, ["--url", postgres_url, "--queue", pg_queue.queue_name])
    start = next(factory)
    try:
        worker = start(concurrency=2, idle_block=0.5)
        hold_a_slot(pg_queue, tmp_path)
        a_push_starts_beside_the_held_task(pg_queue, worker, tmp_path)
    finally:
        with contextlib.suppress(StopIteration):
            next(factory)


# -- the Redis doorbell's own connection ---------------------------------------------------


def _blocked(server: PrivateRedis) -> int:
    """Clients of the server blocked in BLPOP now."""
    client = redis.Redis.from_url(server.url)
    try:
        return sum(1 for entry in client.client_list() if entry.get("cmd") == "blpop")
    finally:
        client.close()


def test_a_withdrawn_doorbell_leaves_the_wake_up_to_another_consumer(
    queue: QueueManager, server: PrivateRedis
) -> None:
    """Redis hands a marker to the client that blocked first: a worker with every slot busy
    must not keep a BLPOP there, or an idle worker sleeps through the next push. The other
    consumer here blocks for 30 s: only the push's marker can wake it in time."""
    assert queue.reserve(timeout=0) is None
    assert queue.doorbell(5.0) is not None
    wait_until(lambda: _blocked(server) == 1, 10, message="the doorbell's BLPOP")
    queue.withdraw_doorbell()
    wait_until(lambda: _blocked(server) == 0, 10, message="the BLPOP to be taken back")
    consumer = redis.Redis.from_url(server.url, socket_timeout=60)
    woken: list[Any] = []
    wake_key = QueueKeys.for_queue(QUEUE).wake
    waiting = threading.Thread(target=lambda: woken.append(consumer.blpop([wake_key], 30)))
    waiting.start()
    try:
        wait_until(lambda: _blocked(server) == 1, 10, message="the other consumer to block")
        assert queue.push("w", {}, 5)
        waiting.join(20)
        assert woken and woken[0] is not None, "the wake-up went to the withdrawn doorbell"
    finally:
        waiting.join(40)
        consumer.close()


def test_a_doorbell_unanswered_past_its_timeout_asks_again(
    queue: QueueManager, server: PrivateRedis
) -> None:
    """A paused master never answers the outstanding BLPOP: the doorbell gives that
    connection up once the answer is overdue instead of waiting on it for good."""
    first = queue.doorbell(0.05)
    assert first is not None
    wait_until(lambda: _blocked(server) == 1, 10, message="the doorbell's BLPOP")
    server.pause()
    try:
        assert queue.doorbell(0.05) == first  # not overdue yet: the same wait goes on
        wait_until(lambda: queue.doorbell(0.05) != first, 20, interval=0.2,
                   message="the overdue BLPOP to be given up")  # fmt: skip
    finally:
        server.resume()
    wait_until(lambda: queue.doorbell(0.05) is not None, 20, interval=0.2,
               message="a new doorbell once the server answers")  # fmt: skip


def _blocking(client: redis.Redis, *, fresh: bool = False) -> bool:
    """A client of the server blocks in BLPOP (``fresh``: sent within the last second)."""
    return any(
        c.get("cmd") == "blpop" and (not fresh or int(c.get("idle", 9)) == 0)
        for c in client.client_list()
    )


@pytest.mark.parametrize("how", ["SIGTERM", "conveyor stop"])
def test_an_idle_worker_stops_at_once(
    how: str, queue: QueueManager, start_worker: StartWorker, server: PrivateRedis
) -> None:
    """An idle worker waits on the doorbell and on a pipe that its signal handler, and the
    heartbeat thread that hears a stop request, ring: the stop ends the wait at once. In a
    blocking claim, the handler ran but the claim went on blocking (a wait resumes after a
    handler), here for up to 30 s; a stop request waited for the doorbell's block (5 s)."""
    worker = start_worker(concurrency=1, idle_block=30, heartbeat=0.2)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        wait_until(lambda: _blocking(client, fresh=True), 30, message="a fresh BLPOP")
        stops_at_once(how, worker, queue)
    finally:
        client.close()


def stops_at_once(how: str, worker: Worker, queue: QueueManager) -> None:
    """Stop an idle worker by SIGTERM or ``conveyor stop`` (``how``): it exits 0 at once."""
    sent = time.monotonic()
    if how == "SIGTERM":
        worker.signal(signal.SIGTERM)
    else:
        assert queue.request_stop(worker.id) == 1
    assert worker.wait(timeout=60) == 0
    took = time.monotonic() - sent
    assert took < 3, f"an idle worker took {took:.1f}s to stop after {how}"


def test_a_withdrawn_doorbell_that_took_a_wake_up_puts_it_back(
    queue: QueueManager, server: PrivateRedis
) -> None:
    """A worker that fills up takes its BLPOP back. If a push's marker had reached it
    already, closing the connection would throw the marker away, and another idle worker
    would sleep through that push: the marker goes back on the list instead."""
    wake = QueueKeys.for_queue(QUEUE).wake
    client = redis.Redis.from_url(server.url)
    try:
        fd = queue.doorbell(4.0)
        assert fd is not None
        wait_until(lambda: _blocking(client), 30, message="the doorbell's BLPOP to block")
        queue.push("woken", {})
        assert select.select([fd], [], [], 30)[0], "the push did not ring the doorbell"
        queue.withdraw_doorbell()
        assert client.llen(wake) == 1, "the wake-up the doorbell took was lost"
        assert not _blocking(client)
    finally:
        client.close()
