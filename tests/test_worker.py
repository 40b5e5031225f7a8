"""The worker daemon end to end: real worker processes, real signals, real SQLite and Redis.

Each test runs ``tests/helpers/run_worker.py`` (a TaskWorker over the pipelines in
``tests/helpers/pipelines.py``) with ``subprocess.Popen`` and talks to it only as production
does: through the queue, and with signals. What the steps did is proved by files they write
in ``tmp_path`` (run counters, timestamps, pids; see ``helpers.pipelines.record``), never by
the worker reporting on itself. Nothing waits with a bare sleep: every wait polls a file or
the task record against a deadline.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Helper, backend_params, wait_until
from conveyor import QueueManager, TaskRecord, TaskStatus
from helpers.pipelines import runs

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

MakeQueue = Callable[..., QueueManager]
SpawnHelper = Callable[..., Helper]

SUCCESS, PENDING, FAILED = TaskStatus.SUCCESS, TaskStatus.PENDING, TaskStatus.FAILED
CANCELED, SCHEDULED = TaskStatus.CANCELED, TaskStatus.SCHEDULED


# -- the worker under test ------------------------------------------------------------------


@dataclass
class Worker:
    """A ``run_worker.py`` process that printed ``ready``."""

    helper: Helper
    id: str

    @property
    def pid(self) -> int:
        return self.helper.pid

    def signal(self, signum: int) -> None:
        os.kill(self.helper.pid, signum)

    def running(self) -> bool:
        return self.helper.proc.poll() is None

    def wait(self, timeout: float) -> int:
        return self.helper.wait(timeout)

    def stderr(self) -> str:
        return self.helper.stderr()


StartWorker = Callable[..., Worker]


@pytest.fixture
def start_worker(
    make_queue: MakeQueue, spawn_helper: SpawnHelper, backend_url: str, queue_name: str
) -> Iterator[StartWorker]:
    """Factory: ``start_worker(concurrency=4, max_shutdown_wait=1, ...)`` (run_worker flags).

    Depends on ``make_queue`` so the workers are killed before the queue is cleared.
    """
    yield from worker_factory(spawn_helper, ["--url", backend_url, "--queue", queue_name])


def worker_factory(spawn_helper: SpawnHelper, base_args: list[str]) -> Iterator[StartWorker]:
    """Start run_worker.py with ``base_args`` plus the options as flags; kill them after."""
    started: list[Worker] = []

    def factory(**options: Any) -> Worker:
        args = list(base_args)
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        helper = spawn_helper("run_worker.py", *args)
        worker = Worker(helper, helper.expect("ready", timeout=30))
        started.append(worker)
        return worker

    yield factory
    for worker in started:
        worker.helper.stop()  # SIGKILL if still running; its children die with it


# -- polling helpers --------------------------------------------------------------------------


def _describe(record: TaskRecord | None) -> str:
    if record is None:
        return "missing"
    events = [f"{event.event}@{event.attempt}" for event in record.history]
    return (
        f"status={record.status} attempts={record.attempts} dead_reason={record.dead_reason} "
        f"error={record.error} history={events}"
    )


def wait_status(
    queue: QueueManager,
    task_id: str,
    *statuses: TaskStatus,
    timeout: float = 20.0,
    worker: Worker | None = None,
) -> TaskRecord:
    """Poll the task record until its status is one of ``statuses``; return the record."""

    def reached() -> TaskRecord | None:
        record = queue.get_task(task_id)
        return record if record is not None and record.status in statuses else None

    def explain() -> str:
        tail = f"\nworker stderr:\n{worker.stderr()}" if worker is not None else ""
        return f"task {task_id} to be {[str(s) for s in statuses]}: " + (
            _describe(queue.get_task(task_id)) + tail
        )

    record: TaskRecord = wait_until(reached, timeout, interval=0.05, message=explain)
    return record


def wait_runs(
    directory: Path,
    task_id: str,
    what: str,
    *,
    count: int = 1,
    timeout: float = 20.0,
    worker: Worker | None = None,
) -> list[dict[str, Any]]:
    """Poll the side-effect file until ``what`` ran ``count`` times for ``task_id``."""

    def explain() -> str:
        tail = f"\nworker stderr:\n{worker.stderr()}" if worker is not None else ""
        return f"{count} run(s) of {what} for {task_id}{tail}"

    found: list[dict[str, Any]] = wait_until(
        lambda: (r := runs(directory, task_id, what)) and len(r) >= count and r,
        timeout,
        message=explain,
    )
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def events(record: TaskRecord) -> list[str]:
    return [event.event for event in record.history]


def event_times(record: TaskRecord, name: str) -> list[float]:
    return [event.at.timestamp() for event in record.history if event.event == name]


# -- 1-3. signals -----------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_waits_for_the_running_task_and_starts_no_other(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    data = {"dir": str(tmp_path)}
    queue.push("long", {**data, "seconds": 3}, priority=9, type="sleepy")
    queue.push("next", {**data, "seconds": 0}, priority=1, type="sleepy")
    worker = start_worker(max_shutdown_wait=10)
    start = wait_runs(tmp_path, "long", "start", worker=worker)[0]

    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    exited = time.time()

    record = queue.get_task("long")
    assert record is not None and record.status == SUCCESS, _describe(record)
    end = runs(tmp_path, "long", "end")
    assert len(end) == 1 and end[0]["at"] - start["at"] >= 2.9, "the task was cut short"
    assert exited - end[0]["at"] < 3.0, "the worker lingered after its last task finished"
    assert runs(tmp_path, "long", "shutdown_seen"), "ctx.shutting_down never became True"
    assert "SIGTERM" in worker.helper.expect("stopped")

    following = queue.get_task("next")
    assert following is not None
    assert following.status == PENDING and following.attempts == 0, _describe(following)
    assert runs(tmp_path, "next", "start") == [], "a new task was started after SIGTERM"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["requeue", "fail"])
def test_sigterm_past_max_shutdown_wait_hands_back_or_fails_the_task(
    mode: str, queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue.push("stuck", {"dir": str(tmp_path), "seconds": 60}, priority=7, type="sleepy")
    worker = start_worker(max_shutdown_wait=1, shutdown_mode=mode)
    start = wait_runs(tmp_path, "stuck", "start", worker=worker)[0]

    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    assert time.monotonic() - signalled < 5.0
    assert runs(tmp_path, "stuck", "end") == []
    wait_until(lambda: not alive(start["pid"]), 5, message="the step's child to be killed")

    record = queue.get_task("stuck")
    assert record is not None
    if mode == "requeue":
        assert record.status == PENDING, _describe(record)
        assert record.attempts == 0, "the hand-back used up an attempt: " + _describe(record)
        assert record.priority == 7
        assert events(record)[-1] == "interrupted", _describe(record)
        assert record.dead_reason is None
        assert queue.get_queue_length() == 1
    else:
        assert record.status == FAILED, _describe(record)
        assert record.dead_reason == "shutdown"
        assert record.error is not None and record.error.type == "WorkerShutdown"
        assert record.attempts == 1


@pytest.mark.slow
def test_a_second_sigint_skips_the_wait_and_hands_the_task_back(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue.push("stuck", {"dir": str(tmp_path), "seconds": 60}, priority=3, type="sleepy")
    worker = start_worker(max_shutdown_wait=60, visibility_timeout=1)
    wait_runs(tmp_path, "stuck", "start", worker=worker)

    worker.signal(signal.SIGINT)
    # The step sees the shutdown flag: the first signal was handled, so the second one is
    # a second signal and not merged with the first.
    wait_runs(tmp_path, "stuck", "shutdown_seen", worker=worker)
    # While it drains, the worker keeps renewing its 1 s lease: for more than two lease
    # lengths nobody else can take the task (each reserve also reaps expired leases).
    watch_until = time.monotonic() + 2.5
    while time.monotonic() < watch_until:
        taken = queue.reserve(timeout=0)
        assert taken is None, "the draining task's lease ran out and it was delivered again"
        time.sleep(0.1)
    assert worker.running(), "one SIGINT must not end the wait of max_shutdown_wait=60"
    second = time.monotonic()
    worker.signal(signal.SIGINT)
    assert worker.wait(timeout=10) == 0
    assert time.monotonic() - second < 10.0

    record = queue.get_task("stuck")
    assert record is not None and record.status == PENDING, _describe(record)
    assert record.attempts == 0 and "interrupted" in events(record), _describe(record)
    assert runs(tmp_path, "stuck", "end") == []


def test_a_step_that_stops_early_on_shutdown_is_handed_back(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue.push("polite", {"dir": str(tmp_path)}, type="cooperative", max_retries=0)
    worker = start_worker(max_shutdown_wait=30)
    wait_runs(tmp_path, "polite", "start", worker=worker)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    assert runs(tmp_path, "polite", "stopped_early"), "the step never saw ctx.shutting_down"

    record = queue.get_task("polite")
    assert record is not None
    assert record.status == PENDING, _describe(record)
    assert record.attempts == 0 and "interrupted" in events(record), _describe(record)


# -- 4. a worker killed mid-task ----------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_task_a_second_worker_completes_it_after_the_lease(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    # 60 s on the first attempt (it is killed), quick on the second.
    queue.push("victim", {"dir": str(tmp_path), "seconds": [60, 0.2]}, type="sleepy")
    first = start_worker(visibility_timeout=2)
    started = wait_runs(tmp_path, "victim", "start", worker=first)[0]
    wait_until(
        lambda: any(info.get("id") == first.id for info in queue.workers()),
        10,
        message="the first worker to register",
    )
    first.signal(signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    wait_until(lambda: not alive(started["pid"]), 5, message="the orphaned step to die too")

    second = start_worker(visibility_timeout=2)
    record = wait_status(queue, "victim", SUCCESS, timeout=20, worker=second)
    # The killed worker never unregistered: its entry expires with its heartbeat's ttl.
    wait_until(
        lambda: all(info.get("id") != first.id for info in queue.workers()),
        10,
        message="the killed worker's registry entry to expire",
    )
    assert record.attempts == 2, _describe(record)
    # Brought back by the lease running out (SQLite, Redis) or, on RabbitMQ, by the broker
    # when the dead worker's connection closed.
    assert {"lease_expired", "redelivered"} & set(events(record)), _describe(record)
    attempts = runs(tmp_path, "victim", "start")
    assert [run["attempt"] for run in attempts] == [1, 2]
    assert [run["worker_pid"] for run in attempts] == [first.pid, second.pid]
    assert [run["attempt"] for run in runs(tmp_path, "victim", "end")] == [2]


# -- 5, 6, 13. retries --------------------------------------------------------------------------


def test_a_step_that_raises_twice_then_succeeds_runs_earlier_steps_once(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue.push("flaky", {"dir": str(tmp_path), "fail_times": 2}, type="flaky", retry_backoff=0.05)
    worker = start_worker()
    record = wait_status(queue, "flaky", SUCCESS, FAILED, worker=worker)

    assert record.status == SUCCESS, _describe(record)
    assert record.attempts == 3
    assert events(record).count("retrying") == 2, _describe(record)
    assert events(record).count("started") == 3
    assert len(runs(tmp_path, "flaky", "prepare")) == 1, "a finished step ran again"
    wobbles = runs(tmp_path, "flaky", "wobble")
    assert [run["attempt"] for run in wobbles] == [1, 2, 3]
    assert all(run["saw"]["prepared_on_attempt"] == 1 for run in wobbles)
    assert len(runs(tmp_path, "flaky", "finish")) == 1
    assert record.result == {"finished_on_attempt": 3, "steps_seen": ["prepare", "wobble"]}
    assert record.error is not None and record.error.type == "ConnectionError"


def test_a_step_that_always_raises_backs_off_longer_each_time_then_fails(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    backoff = 0.3
    queue.push(
        "doomed", {"dir": str(tmp_path)}, type="doomed", max_retries=3, retry_backoff=backoff
    )
    worker = start_worker(jitter=0)
    record = wait_status(queue, "doomed", FAILED, worker=worker)

    assert record.attempts == 4, _describe(record)
    assert record.dead_reason == "error"
    assert [run["attempt"] for run in runs(tmp_path, "doomed", "always_fails")] == [1, 2, 3, 4]
    assert record.error is not None
    assert record.error.type == "RuntimeError"
    assert "kaboom on attempt 4" in record.error.message
    assert record.error.traceback is not None
    assert "explode_always" in record.error.traceback, record.error.traceback

    scheduled = event_times(record, "retrying")
    reserved = event_times(record, "started")
    assert len(scheduled) == 3 and len(reserved) == 4, _describe(record)
    waits = [reserved[i + 1] - scheduled[i] for i in range(3)]
    assert waits[0] < waits[1] < waits[2], f"retry delays did not grow: {waits}"
    for i, waited in enumerate(waits):
        assert waited >= backoff * 2**i - 0.05, f"retry {i + 1} came early: {waits}"


def test_a_retry_resumes_at_the_failed_step(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue.push("resume", {"dir": str(tmp_path), "fail_times": 1}, type="flaky", retry_backoff=1.0)
    worker = start_worker()
    waiting = wait_status(queue, "resume", SCHEDULED, SUCCESS, FAILED, worker=worker)
    assert waiting.status == SCHEDULED, _describe(waiting)
    # While it waits for its retry, the record holds the checkpoint of step 1 only.
    assert set(waiting.steps) == {"prepare"}, waiting.steps

    record = wait_status(queue, "resume", SUCCESS, FAILED, worker=worker)
    assert record.status == SUCCESS and record.attempts == 2, _describe(record)
    prepared = runs(tmp_path, "resume", "prepare")
    assert len(prepared) == 1, "the checkpoint did not skip step 1 on the retry"
    step1 = {"prepared_on_attempt": 1, "at": prepared[0]["at"]}
    assert record.steps["prepare"] == step1
    wobbles = runs(tmp_path, "resume", "wobble")
    assert [run["attempt"] for run in wobbles] == [1, 2]
    assert wobbles[1]["saw"] == step1, "the retry did not get step 1's stored result"
    assert [run["attempt"] for run in runs(tmp_path, "resume", "finish")] == [2]


# -- 7. hard limits and crashing steps ------------------------------------------------------------


MISBEHAVIOURS = {
    # mode of the step: (dead_reason, error type, words in the error message)
    "hang": ("timeout", "TimeLimitExceeded", "time limit"),
    # The exit code is not checked here: see test_a_crashed_step_records_its_exit_code.
    "exit": ("crashed", "WorkerCrashed", "died"),
    "segv": ("crashed", "WorkerCrashed", "died"),
}


@pytest.mark.parametrize("mode", list(MISBEHAVIOURS))
def test_a_misbehaving_step_is_killed_and_the_same_worker_goes_on(
    mode: str, queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    reason, error_type, detail = MISBEHAVIOURS[mode]
    data = {"dir": str(tmp_path)}
    queue.push("bad", {**data, "mode": mode}, priority=9, type="misbehave", max_retries=0)
    queue.push("good", {**data, "mode": "ok"}, priority=1, type="misbehave")
    worker = start_worker()
    good = wait_status(queue, "good", SUCCESS, FAILED, worker=worker)
    assert good.status == SUCCESS, _describe(good)

    bad = queue.get_task("bad")
    assert bad is not None and bad.status == FAILED, _describe(bad)
    assert bad.dead_reason == reason and bad.attempts == 1, _describe(bad)
    assert bad.error is not None and bad.error.type == error_type
    assert detail in bad.error.message, bad.error.message
    if mode == "hang":
        assert bad.started_at is not None and bad.finished_at is not None
        ran = (bad.finished_at - bad.started_at).total_seconds()
        assert 0.9 <= ran < 5, f"killed after {ran:.2f}s, the limit is 1s"

    bad_run = runs(tmp_path, "bad", "start")[0]
    good_run = runs(tmp_path, "good", "start")[0]
    assert bad_run["worker_pid"] == good_run["worker_pid"] == worker.pid
    assert good_run["pid"] != bad_run["pid"], "the broken child was not replaced"
    assert not alive(bad_run["pid"])
    assert worker.running()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0


def test_a_crashed_step_records_its_exit_code(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue.push("late", {"dir": str(tmp_path), "mode": "exit_late"}, type="misbehave", max_retries=0)
    worker = start_worker()
    record = wait_status(queue, "late", FAILED, SUCCESS, worker=worker)
    assert record.dead_reason == "crashed", _describe(record)
    assert record.error is not None
    assert "exit code 3" in record.error.message, record.error.message


# -- 8, 9. concurrency and recycling --------------------------------------------------------------


@pytest.mark.slow
def test_concurrency_4_runs_4_slow_tasks_at_the_same_time(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    ids = [f"c{i}" for i in range(4)]
    for task_id in ids:
        queue.push(task_id, {"dir": str(tmp_path), "seconds": 1.5}, type="sleepy")
    worker = start_worker(concurrency=4)
    for task_id in ids:
        wait_status(queue, task_id, SUCCESS, worker=worker)

    starts = [runs(tmp_path, task_id, "start")[0] for task_id in ids]
    ends = [runs(tmp_path, task_id, "end")[0] for task_id in ids]
    latest_start = max(run["at"] for run in starts)
    earliest_end = min(run["at"] for run in ends)
    assert latest_start < earliest_end, "the four tasks never all ran at one instant"
    assert len({run["pid"] for run in starts}) == 4
    assert {run["worker_pid"] for run in starts} == {worker.pid}


def test_max_jobs_5_exits_0_after_5_tasks_and_loses_none(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    ids = [f"j{i:02d}" for i in range(12)]
    queue.push_many(
        [{"task_id": task_id, "data": {"dir": str(tmp_path)}, "type": "quick"} for task_id in ids]
    )
    worker = start_worker(max_jobs=5)
    assert worker.wait(timeout=30) == 0
    assert "max_jobs (5)" in worker.helper.expect("stopped")

    records = {task_id: queue.get_task(task_id) for task_id in ids}
    statuses = [record.status if record else None for record in records.values()]
    assert statuses.count(SUCCESS) == 5 and statuses.count(PENDING) == 7, statuses
    ran = {task_id for task_id in ids if runs(tmp_path, task_id, "note")}
    done = {task_id for task_id, record in records.items() if record and record.status == SUCCESS}
    assert ran == done
    assert all(r.attempts == 0 for r in records.values() if r and r.status == PENDING)
    assert queue.get_queue_length() == 7


# -- 10. cancel --------------------------------------------------------------------------------


def test_cancel_of_a_running_task_stops_it_before_its_next_step(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue.push("gated", {"dir": str(tmp_path)}, priority=9, type="gate")
    worker = start_worker()
    wait_runs(tmp_path, "gated", "gate_open", worker=worker)

    assert queue.cancel("gated") is True
    record = wait_status(queue, "gated", CANCELED, SUCCESS, FAILED, timeout=10, worker=worker)
    assert record.status == CANCELED, _describe(record)
    assert runs(tmp_path, "gated", "cancel_seen"), "step 1 never saw ctx.cancelled"

    # The worker carries on; once it finished a later task, step 2 can no longer be running.
    queue.push("later", {"dir": str(tmp_path)}, priority=1, type="quick")
    wait_status(queue, "later", SUCCESS, worker=worker)
    assert runs(tmp_path, "gated", "after_gate") == [], "step 2 ran after the cancel"
    final = queue.get_task("gated")
    assert final is not None and final.status == CANCELED, _describe(final)
    assert runs(tmp_path, "later", "note")[0]["worker_pid"] == worker.pid


def test_a_step_that_raises_on_cancel_ends_canceled(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue.push("polite", {"dir": str(tmp_path)}, type="cooperative", max_retries=0)
    worker = start_worker()
    wait_runs(tmp_path, "polite", "start", worker=worker)
    assert queue.cancel("polite") is True
    wait_runs(tmp_path, "polite", "stopped_early", worker=worker)
    record = wait_status(queue, "polite", CANCELED, FAILED, SUCCESS, timeout=10, worker=worker)
    assert record.status == CANCELED, _describe(record)
    assert record.dead_reason is None


# -- 11. priorities -----------------------------------------------------------------------------


def test_priorities_end_to_end_highest_first_fifo_within_a_priority(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    rng = random.Random(11)
    pushed = [(f"p{i:03d}", rng.randint(0, 10)) for i in range(200)]
    data = {"dir": str(tmp_path)}
    items = [
        {"task_id": task_id, "data": {**data, "priority": p}, "priority": p, "type": "ordered"}
        for task_id, p in pushed
    ]
    assert queue.push_many(items) == [True] * 200
    order_log = tmp_path / "order.log"
    worker = start_worker(concurrency=1)

    def started() -> list[str]:
        return order_log.read_text().splitlines() if order_log.exists() else []

    lines = wait_until(
        lambda: len(s := started()) >= 200 and s,
        60,
        message=lambda: f"200 starts ({len(started())})",
    )
    order = [(line.split()[0], int(line.split()[1])) for line in lines]
    assert len(order) == 200 and {task_id for task_id, _ in order} == {t for t, _ in pushed}
    priorities = [p for _, p in order]
    assert priorities == sorted(priorities, reverse=True), f"out of order: {priorities}"
    for level in set(priorities):
        ids = [task_id for task_id, p in order if p == level]
        assert ids == sorted(ids), f"not FIFO within priority {level}: {ids}"
    wait_until(lambda: queue.stats().counts["success"] == 200, 10, message="all 200 acked")
    assert worker.running()


# -- 12. tasks that can never run ------------------------------------------------------------------


def test_unknown_pipeline_and_invalid_data_fail_at_once_without_retries(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    data = {"dir": str(tmp_path)}
    queue.push("unknown", data, priority=9, type="no_such_pipeline", max_retries=3)
    queue.push("invalid", {**data, "count": "many"}, priority=8, type="validated", max_retries=3)
    queue.push("valid", {**data, "count": 41}, priority=1, type="validated")
    worker = start_worker()
    valid = wait_status(queue, "valid", SUCCESS, FAILED, worker=worker)
    assert valid.status == SUCCESS and valid.result == 42, _describe(valid)

    for task_id, reason, named in (
        ("unknown", "unknown_pipeline", "no_such_pipeline"),
        ("invalid", "invalid_data", "count"),
    ):
        record = queue.get_task(task_id)
        assert record is not None and record.status == FAILED, _describe(record)
        assert record.dead_reason == reason and record.attempts == 1, _describe(record)
        assert "retrying" not in events(record), _describe(record)
        assert record.error is not None and named in record.error.message, record.error
    assert runs(tmp_path, "invalid", "count_up") == [], "a step ran on invalid data"


# -- 14. registration and remote stop ----------------------------------------------------------


def test_a_running_worker_is_registered_and_request_stop_drains_it(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path, queue_name: str
) -> None:
    queue.push("held", {"dir": str(tmp_path)}, type="gate")
    worker = start_worker(heartbeat=0.3)
    wait_runs(tmp_path, "held", "gate_open", worker=worker)

    def entry(state: str | None = None) -> dict[str, Any] | None:
        for info in queue.workers():
            if info.get("id") != worker.id:
                continue
            current = [task["task_id"] for task in info.get("current", [])]
            if current == ["held"] and (state is None or info.get("state") == state):
                return info
        return None

    info = wait_until(entry, 10, message=lambda: f"the worker's entry in {queue.workers()}")
    assert info["pid"] == worker.pid
    assert info["queues"] == [queue_name]
    assert info["host"] == socket.gethostname()
    assert info["concurrency"] == 1
    assert info["state"] == "running"

    assert queue.request_stop(worker.id) == 1
    wait_runs(tmp_path, "held", "shutdown_seen", worker=worker)
    wait_until(lambda: entry("draining"), 10, message="the entry to show state draining")
    assert worker.running(), "a graceful stop must wait for the running task"
    (tmp_path / "held.go").touch()
    assert worker.wait(timeout=15) == 0
    assert "stop requested" in worker.helper.expect("stopped")

    record = queue.get_task("held")
    assert record is not None and record.status == SUCCESS, _describe(record)
    assert runs(tmp_path, "held", "after_gate"), "the drained task did not finish"
    assert all(info.get("id") != worker.id for info in queue.workers())


def test_an_idle_worker_acts_on_sigterm_at_once(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    """Idle after a task, with a 30 s block and the next heartbeat 20 s away, the worker
    stops at once on SIGTERM on every backend: it waits on a doorbell beside its signal
    pipe, or (SQLite) in a claim whose polls also look at that pipe. A claim that only
    polled the database went on for the rest of its block after the handler ran."""
    worker = start_worker(idle_block=30, heartbeat=20)
    queue.push("warm-up", {"dir": str(tmp_path), "seconds": 0}, type="sleepy")
    wait_status(queue, "warm-up", SUCCESS, worker=worker)  # now idle, waiting for work
    sent = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    took = time.monotonic() - sent
    assert took < 3, f"an idle worker took {took:.1f}s to act on SIGTERM"


# -- 15. python worker.py ----------------------------------------------------------------------


def test_python_worker_py_runs_from_a_config_file_and_exits_0_on_sigterm(
    queue: QueueManager,
    spawn_helper: SpawnHelper,
    backend_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue_name = queue.queue_name
    config = tmp_path / "conveyor.yaml"
    settings = {
        "url": backend_url,
        "queue": {"name": queue_name, "visibility_timeout": 10},
        "worker": {
            "queues": [queue_name],
            "pipelines": ["helpers.pipelines:quick"],
            "max_shutdown_wait": 5,
            "heartbeat_interval": 1,
        },
        "logging": {"level": "DEBUG"},
    }
    config.write_text(yaml.safe_dump(settings))
    for name in list(os.environ):
        if name.startswith("CONVEYOR_") or name in ("REDIS_URL", "RABBITMQ_URL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CONVEYOR_CONFIG", str(config))
    search_path = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(search_path))

    ids = [f"w{i}" for i in range(3)]
    for priority, task_id in enumerate(ids):  # no type: the worker runs a single pipeline
        queue.push(task_id, {"dir": str(tmp_path)}, priority=priority)
    proc = spawn_helper(str(ROOT / "worker.py"))
    for task_id in ids:
        record = wait_status(queue, task_id, SUCCESS, FAILED, timeout=30)
        assert record.status == SUCCESS, _describe(record) + proc.stderr()
        assert record.result == {"worker_pid": proc.pid}

    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, proc.stderr()


# -- several queues per worker ------------------------------------------------------------------


def test_several_queues_are_served_in_strict_priority_order(
    queue: QueueManager,
    make_queue: MakeQueue,
    start_worker: StartWorker,
    queue_name: str,
    tmp_path: Path,
) -> None:
    """`-Q high,low`: every task of the first queue runs before any of the second, whatever
    the tasks' own priorities; the second queue is still served once the first is empty."""
    low = make_queue(queue_name=f"{queue_name}-low")
    data = {"dir": str(tmp_path)}
    for i in range(5):
        assert low.push(f"low{i}", {**data, "priority": 10}, 10, type="ordered")
        assert queue.push(f"high{i}", {**data, "priority": 0}, 0, type="ordered")
    order_log = tmp_path / "order.log"
    start_worker(queue=f"{queue_name},{queue_name}-low")

    def started() -> list[str]:
        return order_log.read_text().split() if order_log.exists() else []

    wait_until(lambda: len(started()) >= 20, 30, message=lambda: f"10 starts: {started()}")
    order = started()[::2]
    assert order == [f"high{i}" for i in range(5)] + [f"low{i}" for i in range(5)], order
    assert low.push("late-low", {**data, "priority": 3}, 3, type="ordered")
    wait_until(lambda: "late-low" in started(), 10, message="the second queue still served")


# -- hostile results and damaged records ------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "named"), [("deep", "nested"), ("huge", "bytes"), ("bulky", "bytes")]
)
def test_a_result_the_queue_cannot_store_fails_the_task_and_the_worker_goes_on(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path, mode: str, named: str
) -> None:
    """A step's result over the JSON policy (too deep, too large, or step results together
    over the size limit) fails its task at once, recorded with the reason: retrying would
    return the same. The worker does not crash, and the next task runs."""
    data = {"dir": str(tmp_path)}
    queue.push("bad", {**data, "mode": mode}, priority=9, type="hostile", max_retries=3)
    queue.push("good", {**data, "mode": "ok"}, priority=1, type="hostile")
    worker = start_worker()
    record = wait_status(queue, "bad", FAILED, worker=worker)
    assert record.dead_reason == "invalid_result" and record.attempts == 1, _describe(record)
    assert record.error is not None and named in record.error.message, record.error
    assert "retry_scheduled" not in events(record)
    good = wait_status(queue, "good", SUCCESS, FAILED, worker=worker)
    assert good.status == SUCCESS and good.result == {"done": "ok"}, _describe(good)
    assert worker.running()
    assert record.result is None and record.steps.keys() <= {"first"}, _describe(record)


def test_huge_and_unprintable_failures_are_recorded_cut_and_the_worker_goes_on(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    data = {"dir": str(tmp_path)}
    queue.push("loud", {**data, "mode": "loud"}, priority=9, type="hostile")
    queue.push("mute", {**data, "mode": "unprintable"}, priority=8, type="hostile")
    worker = start_worker()
    loud = wait_status(queue, "loud", FAILED, worker=worker)
    assert loud.attempts == 2 and loud.dead_reason == "error", _describe(loud)
    assert loud.error is not None and loud.error.traceback is not None
    assert len(loud.error.message) < 5000 and "characters cut" in loud.error.message
    assert len(loud.error.traceback) < 40_000 and "RuntimeError" in loud.error.traceback
    assert loud.progress_message is not None and len(loud.progress_message) < 5000
    mute = wait_status(queue, "mute", FAILED, worker=worker)
    assert mute.error is not None and mute.error.type == "UnprintableError", _describe(mute)
    assert "unprintable" in mute.error.message
    assert worker.running()


@pytest.mark.parametrize("backend_name", backend_params("sqlite", "redis"))
def test_a_stored_too_deep_payload_is_dead_lettered_and_the_worker_goes_on(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path, backend_url: str
) -> None:
    """Each worker that claimed such a record used to exit with RecursionError, delivery
    after delivery: now the first claim dead-letters it as malformed, with the reason."""
    data = {"dir": str(tmp_path)}
    queue.push("deep", {**data, "mode": "ok"}, priority=9, type="hostile")
    deep = "[" * 100_000 + "]" * 100_000
    if backend_url.startswith("sqlite"):
        import sqlite3
        from contextlib import closing

        from conveyor.backends import sqlite_path_from_url

        with closing(sqlite3.connect(sqlite_path_from_url(backend_url), timeout=10)) as db, db:
            db.execute("UPDATE tasks SET data = ? WHERE queue = ? AND id = 'deep'",
                       (deep, queue.queue_name))  # fmt: skip
    else:
        import redis

        client = redis.Redis.from_url(backend_url)
        client.hset(f"conveyor:{{{queue.queue_name}}}:task:deep", "data", deep)
        client.close()
    queue.push("next", {**data, "mode": "ok"}, priority=1, type="hostile")
    worker = start_worker()
    dead = wait_status(queue, "deep", FAILED, worker=worker)
    assert dead.dead_reason == "malformed" and dead.error is not None, _describe(dead)
    assert "nested" in dead.error.message
    assert wait_status(queue, "next", SUCCESS, FAILED, worker=worker).status == SUCCESS
    assert worker.running()
