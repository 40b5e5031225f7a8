"""``worker.pool: thread``: steps run in threads of the worker, under the same loop.

Real worker processes (``helpers/run_worker.py --pool thread``) on SQLite and Redis, proved
by the files the steps write (which also carry the pid a step ran in) and by the task
records; the settings a thread cannot honour are refused before any task is taken.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Helper, backend_params
from conveyor import (
    ConfigError,
    Pipeline,
    PipelineService,
    QueueManager,
    StepContext,
    TaskStatus,
    TaskWorker,
    WorkerOptions,
)
from helpers.pipelines import runs
from test_worker import Worker, _describe, wait_runs, wait_status, worker_factory

#: Every helper pipeline but ``misbehave`` (its step has a hard time limit: refused).
THREAD_SAFE = ",".join(
    f"helpers.pipelines:{name}"
    for name in ("sleepy", "flaky", "doomed", "gate", "cooperative", "ordered", "quick")
)

StartWorker = Callable[..., Worker]


@pytest.fixture(params=backend_params("sqlite", "redis"))
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start_worker(
    make_queue: Callable[..., QueueManager], spawn_helper: Callable[..., Helper],
    backend_url: str, queue_name: str,
) -> Iterator[StartWorker]:  # fmt: skip
    """``start_worker(concurrency=2, ...)``: a thread-pool run_worker.py that printed ready."""
    args = ["--url", backend_url, "--queue", queue_name, "--pool", "thread"]
    yield from worker_factory(spawn_helper, [*args, "--pipelines", THREAD_SAFE])


def test_threads_run_pipelines_with_retries_in_the_worker_process(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    data = {"dir": str(tmp_path)}
    queue.push("flaky", {**data, "fail_times": 2}, priority=5, type="flaky")
    for i in range(6):
        queue.push(f"nap{i}", {**data, "seconds": 0}, priority=i % 3, type="sleepy")
    worker = start_worker(concurrency=2)

    record = wait_status(queue, "flaky", TaskStatus.SUCCESS, worker=worker)
    assert record.attempts == 3, _describe(record)
    assert len(runs(tmp_path, "flaky", "prepare")) == 1, "a checkpointed step ran again"
    assert len(runs(tmp_path, "flaky", "wobble")) == 3
    for i in range(6):
        wait_status(queue, f"nap{i}", TaskStatus.SUCCESS, worker=worker)
    pids = {run["pid"] for i in range(6) for run in runs(tmp_path, f"nap{i}", "start")}
    assert pids == {worker.pid}, "a step ran outside the worker process"
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0


def test_sigterm_waits_for_a_running_thread_then_exits_0(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    data = {"dir": str(tmp_path)}
    queue.push("long", {**data, "seconds": 2}, priority=9, type="sleepy")
    queue.push("next", {**data, "seconds": 0}, priority=1, type="sleepy")
    worker = start_worker(max_shutdown_wait=10)
    wait_runs(tmp_path, "long", "start", worker=worker)

    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert queue.get_task("long").status == TaskStatus.SUCCESS  # type: ignore[union-attr]
    assert runs(tmp_path, "long", "shutdown_seen"), "ctx.shutting_down never became True"
    following = queue.get_task("next")
    assert following is not None and following.status == TaskStatus.PENDING
    assert not runs(tmp_path, "next", "start"), "a task started after the signal"


def test_a_thread_still_running_after_the_wait_is_handed_back(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue.push("stuck", {"dir": str(tmp_path), "seconds": 30}, priority=5, type="sleepy")
    worker = start_worker(max_shutdown_wait=0.5)
    wait_runs(tmp_path, "stuck", "start", worker=worker)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    record = queue.get_task("stuck")
    assert record is not None and record.status == TaskStatus.PENDING, _describe(record)


limited = Pipeline("limited")


@limited.step(timeout=5)
def bounded(ctx: StepContext) -> None:
    return None


plain = Pipeline("plain")


@plain.step
def nothing(ctx: StepContext) -> None:
    return None


def test_thread_mode_refuses_hard_time_limits_and_memory_mb(tmp_path: Path) -> None:
    with QueueManager.from_url(f"sqlite:///{tmp_path}/q.db", queue_name="t") as queue:
        worker = TaskWorker(queue, PipelineService([limited]), options=WorkerOptions(pool="thread"))
        with pytest.raises(ConfigError, match=r"hard time limit.*worker\.pool: process"):
            worker.start()
        options = WorkerOptions(pool="thread", memory_mb=100)
        worker = TaskWorker(queue, PipelineService([plain]), options=options)
        with pytest.raises(ConfigError, match=r"memory_mb.*worker\.pool: process"):
            worker.start()


exiting = Pipeline("exiting", max_retries=2, retry_backoff=0)


@exiting.step
def exit_once(ctx: StepContext) -> str:
    if ctx.attempt == 1:
        raise SystemExit(3)  # ends the thread, as os._exit ends a child
    return "second try"


def test_a_thread_that_dies_is_a_crashed_run_and_the_slot_gets_a_new_thread(
    tmp_path: Path,
) -> None:
    with QueueManager.from_url(f"sqlite:///{tmp_path}/q.db", queue_name="t") as queue:
        queue.push("dies", {}, 5)
        options = WorkerOptions(pool="thread", max_jobs=2, idle_block=0.1)
        worker = TaskWorker(queue, PipelineService([exiting]), options=options)
        worker.start()  # returns after two runs (max_jobs)
        record = queue.get_task("dies")
        assert record is not None and record.status == TaskStatus.SUCCESS, _describe(record)
        assert record.attempts == 2 and record.result == "second try"
        assert any(event.event == "retrying" for event in record.history), _describe(record)


def test_conveyor_worker_pool_thread_with_memory_exits_2_saying_why(tmp_path: Path) -> None:
    conveyor = Path(sys.executable).parent / "conveyor"
    result = subprocess.run(
        [str(conveyor), "worker", "--url", f"sqlite:///{tmp_path}/q.db", "-Q", "t",
         "--pool", "thread", "--memory", "100", "-P", "helpers.pipelines:quick", "--wait", "0"],
        cwd=Path(__file__).parent, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "worker.memory_mb (100) needs worker.pool: process" in result.stderr
