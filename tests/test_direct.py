"""A child that settles its own task and claims the next one (``worker/direct.py``).

On Redis, and on RabbitMQ over a Redis task store, a worker's child acks a task that
succeeded and claims the next in one call, then tells the worker. These tests run real
workers (``helpers/run_worker.py``) on the shared Redis (and RabbitMQ) and check that the
worker still owns every task a child took that way: the order is strict by priority, the
chained task's hard time limit kills it, a cancel reaches it (and only it), its lease is
renewed past the visibility timeout; on RabbitMQ, a failed task the child took itself is
retried at once and its delivery let go. Then the two pieces it rests on, without a
worker: a cancel names one run, and a forked child never uses the connection it inherited.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import backend_params, rabbitmqctl_rows, wait_until
from conveyor import Pipeline, PipelineService, QueueManager, TaskStatus
from conveyor.worker.child import CANCEL_ANY, _die_with_parent, serve
from helpers.pipelines import runs
from test_worker import (
    SpawnHelper,
    StartWorker,
    _describe,
    start_worker,
    wait_runs,
    wait_status,
    worker_factory,
)

__all__ = ["start_worker"]  # the fixture, used by name below

#: Redis, and RabbitMQ over a Redis task store (a child settles on a link of its own).
BOTH = pytest.mark.parametrize("backend_name", backend_params("redis", "rabbitmq-redis"))
REDIS = pytest.mark.parametrize("backend_name", backend_params("redis"))
RABBITMQ = pytest.mark.parametrize("backend_name", backend_params("rabbitmq-redis"))
SUCCESS, FAILED, CANCELED = TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.CANCELED
BY_CHILD = "(settled by its child)"


@BOTH
def test_a_chained_drain_keeps_strict_priority_order(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    priorities = [(i * 7) % 11 for i in range(40)]
    for i, priority in enumerate(priorities):
        queue.push(f"o{i:02d}", {"dir": str(tmp_path), "priority": priority}, priority,
                   type="ordered")  # fmt: skip
    worker = start_worker()
    wait_until(lambda: (tmp_path / "order.log").exists()
               and len((tmp_path / "order.log").read_text().splitlines()) == 40,
               timeout=30, message=lambda: worker.stderr()[-3000:])  # fmt: skip
    seen = [int(line.split()[1]) for line in (tmp_path / "order.log").read_text().splitlines()]
    assert seen == sorted(priorities, reverse=True)
    for i in range(40):
        wait_status(queue, f"o{i:02d}", SUCCESS, worker=worker)
    log = worker.helper.stderr_path.read_text(errors="replace")
    assert log.count(BY_CHILD) >= 39, "the child did not settle the tasks itself"


@BOTH
def test_the_hard_time_limit_of_a_task_the_child_took_itself_is_enforced(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    data = {"dir": str(tmp_path)}
    queue.push("good", {**data, "mode": "ok"}, priority=9, type="misbehave")
    queue.push("bad", {**data, "mode": "hang"}, priority=1, type="misbehave", max_retries=0)
    worker = start_worker()
    assert wait_status(queue, "good", SUCCESS, worker=worker).status == SUCCESS
    bad = wait_status(queue, "bad", FAILED, SUCCESS, worker=worker)
    assert bad.dead_reason == "timeout", _describe(bad)
    assert bad.started_at is not None and bad.finished_at is not None
    assert (bad.finished_at - bad.started_at).total_seconds() < 5
    assert BY_CHILD in worker.stderr()
    bad_run, good_run = runs(tmp_path, "bad", "start")[0], runs(tmp_path, "good", "start")[0]
    assert bad_run["pid"] == good_run["pid"], "the child did not go on to the next task itself"


@RABBITMQ
def test_a_task_the_child_took_itself_is_not_run_again_when_killed_for_its_time_limit(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    """On RabbitMQ the child's channel holds the delivery of a task it took itself, and
    killing the child puts it back in the queue at once: the worker stores the timeout
    first, so another worker waiting on the queue finds a stale message, not a task whose
    holder died."""
    data = {"dir": str(tmp_path)}
    queue.push("good", {**data, "mode": "ok"}, priority=9, type="misbehave")
    queue.push("bad", {**data, "mode": "hang"}, priority=1, type="misbehave", max_retries=0)
    first = start_worker(concurrency=1)
    wait_until(lambda: runs(tmp_path, "bad", "start"), 15, message=first.stderr)
    second = start_worker(concurrency=1)  # idle: its doorbell waits on the queue
    bad = wait_status(queue, "bad", FAILED, SUCCESS, worker=first)
    assert bad.dead_reason == "timeout", _describe(bad)
    assert BY_CHILD in first.stderr()  # "bad" was the child's own claim
    queue.push("after", {**data, "mode": "ok"}, priority=5, type="misbehave")
    wait_status(queue, "after", SUCCESS, worker=second)  # the second worker was listening
    assert len(runs(tmp_path, "bad", "start")) == 1, second.stderr()[-3000:]


@BOTH
def test_a_child_that_dies_in_a_task_it_took_itself_fails_that_task(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    """The worker reads the child's notices before it looks at the child's death, so the
    crash is the task the child was running, not the one it had finished."""
    data = {"dir": str(tmp_path)}
    queue.push("good", {**data, "mode": "ok"}, priority=9, type="misbehave")
    queue.push("bad", {**data, "mode": "exit"}, priority=1, type="misbehave", max_retries=0)
    worker = start_worker()
    bad = wait_status(queue, "bad", FAILED, SUCCESS, worker=worker, timeout=15)
    assert bad.dead_reason == "crashed", _describe(bad)
    good = queue.get_task("good")
    assert good is not None and good.status == SUCCESS, _describe(good)
    log = worker.helper.stderr_path.read_text(errors="replace")
    assert "refused" not in log and BY_CHILD in log


@BOTH
def test_a_cancel_reaches_the_task_the_child_took_itself_and_only_it(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    data = {"dir": str(tmp_path)}
    queue.push("first", data, priority=9, type="quick")
    queue.push("second", data, priority=5, type="cooperative")
    queue.push("third", data, priority=1, type="quick")
    worker = start_worker()
    wait_runs(tmp_path, "second", "start", worker=worker)
    assert queue.cancel("second")
    second = wait_status(queue, "second", CANCELED, FAILED, SUCCESS, worker=worker)
    assert second.status == CANCELED, _describe(second)
    third = wait_status(queue, "third", SUCCESS, FAILED, CANCELED, worker=worker)
    assert third.status == SUCCESS, _describe(third)


@BOTH
def test_the_lease_of_a_task_the_child_took_itself_is_renewed(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    data = {"dir": str(tmp_path)}
    queue.push("first", data, priority=9, type="quick")
    queue.push("long", {**data, "seconds": 4}, priority=1, type="sleepy")
    worker = start_worker(visibility_timeout=1.5)
    record = wait_status(queue, "long", SUCCESS, FAILED, worker=worker, timeout=30)
    assert record.status == SUCCESS and record.attempts == 1, _describe(record)
    assert len(runs(tmp_path, "long", "start")) == 1, "the task ran twice: its lease ran out"
    assert "lease lost" not in worker.stderr()
    assert BY_CHILD in worker.stderr()


@REDIS
def test_a_child_settling_past_the_time_limit_is_not_killed_for_it(
    queue: QueueManager, spawn_helper: SpawnHelper, backend_url: str, queue_name: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The steps end inside the 1 s limit, but the child's own ack then waits 1 s for a
    replica that is not there (``durability``): the run is over, so it is not killed."""
    url = backend_url + ("&" if "?" in backend_url else "?") + "durability=replicas=1,timeout=1"
    data = {"dir": str(tmp_path), "mode": "slow", "seconds": 0.5}
    queue.push("first", data, priority=9, type="misbehave", max_retries=0)
    queue.push("second", data, priority=5, type="misbehave", max_retries=0)
    workers = worker_factory(spawn_helper, ["--url", url, "--queue", queue_name])
    try:
        worker = next(workers)()
        for task_id in ("first", "second"):
            record = wait_status(queue, task_id, SUCCESS, FAILED, worker=worker)
            assert record.status == SUCCESS, _describe(record)
        log = worker.helper.stderr_path.read_text(errors="replace")
        assert "time limit" not in log and "lease lost" not in log and "refused" not in log
        assert BY_CHILD in log
    finally:
        next(workers, None)


@BOTH
def test_no_task_is_claimed_by_a_child_after_max_time(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    """``max_time`` passes while a task runs and before the worker looks (its heartbeat is
    5 s away): the child must not claim the next task on its way out."""
    queue.push("running", {"dir": str(tmp_path), "seconds": 1.5}, priority=9, type="sleepy")
    queue.push("waiting", {"dir": str(tmp_path), "seconds": 0}, priority=5, type="sleepy")
    worker = start_worker(max_time=1.0, heartbeat=5)
    assert wait_status(queue, "running", SUCCESS, worker=worker).status == SUCCESS
    assert worker.wait(timeout=20) == 0
    record = queue.get_task("waiting")
    assert record is not None and record.status == TaskStatus.PENDING, _describe(record)
    assert not runs(tmp_path, "waiting", "start")


@BOTH
def test_a_child_killed_while_reading_its_cancel_flag_never_wedges_the_worker(
    queue: QueueManager, start_worker: StartWorker
) -> None:
    """Kill a child at its hard limit while it polls ``ctx.cancelled`` without pause: had
    the flag a lock shared across processes, some kill would leave it taken, and the
    worker's next write of the flag would block for good."""
    for i in range(12):
        queue.push(f"p{i}", {}, priority=5, type="poller", max_retries=0)
    worker = start_worker()
    for i in range(12):
        record = wait_status(queue, f"p{i}", FAILED, SUCCESS, worker=worker, timeout=30)
        assert record.dead_reason == "timeout", _describe(record)


# -- the pieces, without a worker --------------------------------------------------------------


@pytest.fixture
def child_loop() -> Iterator[tuple[Any, Any]]:
    """``serve`` in a thread over a real pipe, with a shared cancel flag."""
    quick = Pipeline("check")

    @quick.step
    def look(ctx: Any) -> bool:
        return bool(ctx.cancelled)

    context = multiprocessing.get_context("fork")
    ours, theirs = multiprocessing.Pipe(duplex=True)
    cancel, shutdown = context.Value("l", 0), context.Value("b", 0)
    thread = threading.Thread(target=serve, args=(theirs, PipelineService([quick]), cancel,
                                                   shutdown), daemon=True)  # fmt: skip
    thread.start()
    yield ours, cancel
    ours.send_bytes(b'{"op": "stop"}')
    thread.join(5)


def _run(conn: Any, run: int) -> dict[str, Any]:
    request = {"op": "run", "task_id": f"r{run}", "data": {}, "type": "check", "run": run}
    conn.send_bytes(json.dumps(request).encode())
    reply: dict[str, Any] = json.loads(conn.recv_bytes())
    return reply


@REDIS
def test_a_cancel_names_one_run_so_it_cannot_stop_the_next(
    child_loop: tuple[Any, Any], backend_name: str
) -> None:
    conn, cancel = child_loop
    cancel.value = 3  # meant for run 3, which the child already finished
    assert _run(conn, 4)["op"] == "done"
    assert _run(conn, 3)["op"] == "error"  # the run it names is canceled
    cancel.value = CANCEL_ANY  # a thread slot given up on: whatever runs stops
    assert _run(conn, 5)["op"] == "error"


@REDIS
def test_a_forked_child_connects_anew_instead_of_using_the_inherited_connection(
    queue: QueueManager,
) -> None:
    queue.head()  # the kept connection is open now
    client = queue._store._client  # type: ignore[attr-defined]
    assert client._own is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, make a call of its own, and leave without cleanup
        os.close(read)
        dropped = client._own is None
        try:
            queue.head()
            worked = client._own is not None
        except Exception:
            worked = False
        os.write(write, json.dumps([dropped, worked]).encode())
        os._exit(0)
    os.close(write)
    answer = json.loads(os.read(read, 64))
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == [True, True]
    assert queue.push("after-fork", {}, 1)  # the parent's connection is untouched
    assert queue.head() is not None


@RABBITMQ
def test_a_retry_of_a_task_the_child_took_itself_is_published_at_once(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path, queue_name: str
) -> None:
    """On RabbitMQ the child holds the delivery of a task it claimed itself; when that
    task fails, the worker settles it, so the worker publishes its retry's new ticket
    (not a consumer, ``publish_grace`` = 30 s later), and the child lets the old delivery
    go once the worker hands it the next task: it runs twice, not three times."""
    data = {"dir": str(tmp_path)}
    queue.push("good", {**data, "mode": "ok"}, priority=9, type="misbehave")
    queue.push("wobbly", {**data, "fail_times": 1}, priority=1, type="flaky", max_retries=2,
               retry_backoff=0)  # fmt: skip
    worker = start_worker(concurrency=1)
    record = wait_status(queue, "wobbly", SUCCESS, FAILED, worker=worker, timeout=15)
    assert record.status == SUCCESS and record.attempts == 2, _describe(record)
    log = worker.helper.stderr_path.read_text(errors="replace")
    assert BY_CHILD in log  # "good" was settled by the child, which then took "wobbly"
    queue.push("last", {**data, "mode": "ok"}, priority=5, type="misbehave")
    wait_status(queue, "last", SUCCESS, worker=worker)
    assert len(runs(tmp_path, "wobbly", "wobble")) == 2
    assert len(runs(tmp_path, "wobbly", "finish")) == 1
    assert "refused" not in worker.helper.stderr_path.read_text(errors="replace")
    # Nothing is held at rest: the failed try's delivery was let go, not kept by the child.
    wait_until(lambda: _unacked(f"conveyor.{queue_name}") == 0, 15,
               message=lambda: f"unacked: {_unacked(f'conveyor.{queue_name}')}")  # fmt: skip


@RABBITMQ
def test_an_idle_child_lets_go_of_a_failed_task_it_took_itself(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path, queue_name: str
) -> None:
    """The child's channel holds the delivery of a task it claimed itself; when that task
    fails and no next task follows, the worker tells the idle child once the failure is
    stored, so no delivery stays unacked (until the child's next task, or its exit)."""
    data = {"dir": str(tmp_path)}
    queue.push("good", {**data, "mode": "ok"}, priority=9, type="misbehave")
    queue.push("doomed", data, priority=1, type="doomed", max_retries=0)
    worker = start_worker(concurrency=1)
    record = wait_status(queue, "doomed", FAILED, SUCCESS, worker=worker)
    assert record.status == FAILED, _describe(record)
    assert BY_CHILD in worker.stderr()  # the child settled "good" and took "doomed"
    wait_until(lambda: _unacked(f"conveyor.{queue_name}") == 0, 15,
               message=lambda: f"unacked: {_unacked(f'conveyor.{queue_name}')}")  # fmt: skip
    assert worker.running()  # not let go by its exit


def _unacked(broker_queue: str) -> int:
    """Deliveries of a broker queue that a consumer holds (``rabbitmqctl``)."""
    rows = rabbitmqctl_rows("list_queues", "name", "messages_unacknowledged")
    for name, count in rows:
        if name == broker_queue:
            return int(count)
    raise AssertionError(f"rabbitmqctl lists no queue {broker_queue!r}: {rows}")


def _orphan(directory: str) -> None:
    """A child whose parent dies before the child asks for the death signal."""
    parent = multiprocessing.parent_process()
    assert parent is not None
    deadline = time.monotonic() + 10
    while os.getppid() == parent.pid and time.monotonic() < deadline:
        time.sleep(0.01)  # the parent's exit: nothing tells a child of it but this
    Path(directory, "pid").write_text(str(os.getpid()))
    _die_with_parent()
    Path(directory, "carried-on").write_text("")


def _parent_that_dies_at_once(directory: str) -> None:
    multiprocessing.get_context("fork").Process(target=_orphan, args=(directory,)).start()
    os._exit(0)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@REDIS
def test_a_child_whose_worker_died_before_it_started_leaves(
    tmp_path: Path, backend_name: str
) -> None:
    """A worker killed right after it forked a child (a time limit's respawn, then a
    SIGKILL) never sent the death signal: the child exits instead of waiting for requests
    forever on the worker's end of the pipe it inherited."""
    middle = multiprocessing.get_context("fork").Process(
        target=_parent_that_dies_at_once, args=(str(tmp_path),)
    )
    middle.start()
    middle.join(10)
    pid = int(wait_until(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(),
                         15, message="the orphan to start"))  # fmt: skip
    wait_until(lambda: _gone(pid), 15, message="the orphan to exit")
    assert not (tmp_path / "carried-on").exists(), "the orphaned child carried on"
