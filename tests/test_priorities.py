"""Priorities that hold under load: step-boundary preemption, reserved slots, aging.

Real worker processes (``helpers/run_priority_worker.py``) run ``helpers.priority_pipelines``,
whose every step start is a line in a shared ledger; the test's own marks (``push``) go to
the same file. Order is asserted from the ledger, never from times, on every backend.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_until
from conveyor import QueueManager, TaskStatus
from conveyor.errors import ConfigError
from conveyor.lifecycle import Event
from helpers.priority_pipelines import mark, read_ledger

HELPERS = Path(__file__).parent / "helpers"
MakeQueue = Callable[..., QueueManager]
Ledger = list[dict[str, Any]]


class Worker:
    def __init__(self, url: str, queue: str, log: Path, *args: str) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(HELPERS / "run_priority_worker.py"), "--url", url,
                 "--queue", queue, *args],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(lambda: "ready" in self.text(), 30, message="the worker to start")

    def text(self) -> str:
        if self.proc.poll() is not None and "ready" not in self.log.read_text():
            raise AssertionError(f"worker exited early:\n{self.log.read_text()[-3000:]}")
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def start_worker(
    backend_url: str, queue_name: str, tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(*args: str) -> Worker:
        worker = Worker(backend_url, queue_name, tmp_path / f"worker{len(started)}.log", *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def starts(ledger: Ledger, task: str) -> list[int]:
    """Positions in the ledger where ``task`` started a step."""
    return [i for i, line in enumerate(ledger) if line["task"] == task]


def wait_done(queue: QueueManager, ids: list[str], timeout: float) -> None:
    def done() -> bool:
        records = [queue.get_task(task_id) for task_id in ids]
        return all(r is not None and r.status == TaskStatus.SUCCESS for r in records)

    wait_until(done, timeout, message=f"{ids} to succeed")


def steps_ran_once(ledger: Ledger, task: str, count: int) -> None:
    runs = Counter(line["step"] for line in ledger if line["task"] == task)
    assert runs == Counter({f"s{i}": 1 for i in range(1, count + 1)}), (task, runs)


def test_preemption_starts_urgent_work_at_the_next_step_boundary(
    make_queue: MakeQueue, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """Concurrency 2, two preemptible priority-0 pipelines of ten 1-second steps, one
    priority-10 push: the urgent task starts at the next step boundary (without preemption
    it would wait for a whole pipeline), and each long task runs its ten steps once each."""
    queue = make_queue()
    ledger = tmp_path / "ledger"
    data = {"ledger": str(ledger), "seconds": 1.0, "steps": 10}
    assert queue.push("long-a", data, 0, type="long")
    assert queue.push("long-b", data, 0, type="long")
    start_worker("--concurrency", "2", "--preempt-margin", "5")
    wait_until(
        lambda: {"long-a", "long-b"} <= {line["task"] for line in read_ledger(ledger)},
        30, message="both long tasks to start",
    )  # fmt: skip
    assert queue.push("urgent", {"ledger": str(ledger), "seconds": 0.1}, 10, type="quick")
    mark(ledger, "push", "urgent")
    wait_done(queue, ["long-a", "long-b", "urgent"], 90)

    lines = read_ledger(ledger)
    pushed, urgent = starts(lines, "push")[0], starts(lines, "urgent")[0]
    for task in ("long-a", "long-b"):
        between = [i for i in starts(lines, task) if pushed < i < urgent]
        # At most the step it had been let into at the very boundary of the push.
        assert len(between) <= 1, (task, lines[pushed : urgent + 1])
        assert starts(lines, task)[-1] > urgent, f"{task} finished before the urgent task"
        steps_ran_once(lines, task, 10)
    records = {task: queue.get_task(task) for task in ("long-a", "long-b")}
    yielded = [task for task, r in records.items() if r is not None and r.preemptions == 1]
    assert len(yielded) == 1, records
    record = records[yielded[0]]
    assert record is not None
    events = [event for event in record.history if event.event == Event.PREEMPTED]
    assert events[0].note == "preempted by urgent"
    # No attempt was used: it resumed at its next step with the same attempt number.
    assert {line["attempt"] for line in lines if line["task"] == yielded[0]} == {1}
    assert record.attempts == 1
    assert queue.stats().preemptions == 1


def test_two_busy_workers_never_both_yield_for_one_urgent_task(
    make_queue: MakeQueue, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """The yield and the claim are one transition: of two busy workers (one slot each) at
    their step boundaries, exactly one yields for the one urgent task."""
    queue = make_queue()
    ledger = tmp_path / "ledger"
    data = {"ledger": str(ledger), "seconds": 0.5, "steps": 6}
    assert queue.push("long-a", data, 0, type="long")
    assert queue.push("long-b", data, 0, type="long")
    start_worker("--concurrency", "1", "--preempt-margin", "5")
    start_worker("--concurrency", "1", "--preempt-margin", "5")
    wait_until(
        lambda: {"long-a", "long-b"} <= {line["task"] for line in read_ledger(ledger)},
        30, message="both long tasks to start",
    )  # fmt: skip
    assert queue.push("urgent", {"ledger": str(ledger), "seconds": 0.05}, 10, type="quick")
    wait_done(queue, ["long-a", "long-b", "urgent"], 60)
    lines = read_ledger(ledger)
    assert len(starts(lines, "urgent")) == 1
    records = [queue.get_task(task) for task in ("long-a", "long-b")]
    assert sum(r.preemptions for r in records if r is not None) == 1, records
    for task in ("long-a", "long-b"):
        steps_ran_once(lines, task, 6)


def test_max_preemptions_holds(
    make_queue: MakeQueue, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """A task preempted max_preemptions times runs to its end: the next urgent task waits."""
    queue = make_queue()
    ledger = tmp_path / "ledger"
    assert queue.push("long", {"ledger": str(ledger), "seconds": 0.4, "steps": 8}, 0, type="long")
    start_worker("--concurrency", "1", "--preempt-margin", "1", "--max-preemptions", "1")
    wait_until(lambda: starts(read_ledger(ledger), "long"), 30, message="long to start")
    urgent = {"ledger": str(ledger), "seconds": 0.05}
    assert queue.push("u1", urgent, 9, type="quick")
    wait_until(lambda: starts(read_ledger(ledger), "u1"), 30, message="u1 to start")

    def resumed() -> bool:
        lines = read_ledger(ledger)
        return any(i > starts(lines, "u1")[0] for i in starts(lines, "long"))

    wait_until(resumed, 30, message="long to resume after u1")
    assert queue.push("u2", urgent, 9, type="quick")
    mark(ledger, "push", "u2")
    wait_done(queue, ["long", "u1", "u2"], 60)
    lines = read_ledger(ledger)
    assert starts(lines, "u2")[0] > starts(lines, "long")[-1], "u2 preempted long again"
    steps_ran_once(lines, "long", 8)
    record = queue.get_task("long")
    assert record is not None and record.preemptions == 1


def test_a_reserved_slot_starts_urgent_work_at_once(
    make_queue: MakeQueue, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """Concurrency 2 with one slot kept for priority 8 and up: ordinary tasks run one at a
    time, and a priority-9 task starts while the other slot is busy."""
    queue = make_queue()
    ledger = tmp_path / "ledger"
    slow = {"ledger": str(ledger), "seconds": 1.0, "steps": 3}
    for name in ("p0-a", "p0-b"):
        assert queue.push(name, slow, 0, type="rigid")
    start_worker("--concurrency", "2", "--reserve", "8:1")
    wait_until(lambda: read_ledger(ledger), 30, message="an ordinary task to start")
    assert queue.push("p9", {"ledger": str(ledger), "seconds": 0.05}, 9, type="quick")
    mark(ledger, "push", "p9")
    wait_done(queue, ["p0-a", "p0-b", "p9"], 60)
    lines = read_ledger(ledger)
    first = lines[0]["task"]
    second = "p0-b" if first == "p0-a" else "p0-a"
    # The second ordinary task waited for the first (the reserved slot stayed free), and the
    # urgent one started before it, while the first still ran.
    assert starts(lines, second)[0] > starts(lines, first)[-1]
    assert starts(lines, "p9")[0] < starts(lines, first)[-1] or (
        starts(lines, "p9")[0] < starts(lines, second)[0]
    )
    assert starts(lines, "p9")[0] < starts(lines, second)[0]


@pytest.mark.parametrize("backend_name", ["sqlite", "redis"], indirect=False)
@pytest.mark.parametrize("aging", [True, False], ids=["aging", "no-aging"])
def test_aging_bounds_the_wait_under_a_stream_of_urgent_work(
    aging: bool, make_queue: MakeQueue
) -> None:
    """A priority-0 task under a continuous stream of priority-5 tasks: with aging on it is
    claimed once it has waited 5 intervals (every priority-5 task claimed before it became
    ready less than 5 intervals after it); with aging off it is still waiting at the end."""
    interval = 0.05
    queue = make_queue(aging_interval=interval if aging else None)
    assert queue.push("old", {}, 0)
    old = queue.get_task("old")
    assert old is not None
    taken: list[str] = []
    deadline = time.monotonic() + 30 * interval * 5  # 30 bounds
    n = 0
    while time.monotonic() < deadline and "old" not in taken:
        assert queue.push(f"p5-{n}", {}, 5)
        n += 1
        message = queue.reserve(timeout=1)
        assert message is not None
        taken.append(message.task_id)
        assert queue.ack(message)
    if not aging:
        assert "old" not in taken
        record = queue.get_task("old")
        assert record is not None and record.status == TaskStatus.PENDING
        return
    assert "old" in taken, f"old never claimed in {len(taken)} claims"
    bound = old.created_at.timestamp() + 5 * interval
    before = [queue.get_task(task_id) for task_id in taken[: taken.index("old")]]
    late = [r.id for r in before if r is not None and r.created_at.timestamp() > bound]
    assert not late, f"claimed before old though ready after its bound: {late}"


def test_aging_is_refused_on_rabbitmq_with_a_clear_message(tmp_path: Path) -> None:
    from conftest import rabbitmq_url

    with pytest.raises(ConfigError, match=r"aging_interval.*RabbitMQ"):
        QueueManager.from_url(rabbitmq_url(tmp_path), queue_name="aging", aging_interval=1.0)


def test_head_is_the_next_task_to_claim(make_queue: MakeQueue) -> None:
    queue = make_queue()
    assert queue.head() is None
    assert queue.push("low", {}, 1)
    assert queue.push("high", {}, 7)
    head = queue.head()
    assert head is not None and (head.task_id, head.priority) == ("high", 7)
    message = queue.reserve(timeout=1)
    assert message is not None and message.task_id == "high"
    stats = queue.stats()
    assert [(band.priority, band.count) for band in stats.waiting] == [(1, 1)]
    assert stats.waiting[0].oldest_seconds >= 0


# -- the pure decisions -----------------------------------------------------------------------


def test_the_lowest_running_task_yields_and_only_past_margin_and_wait() -> None:
    from conveyor.backends import Head
    from conveyor.worker.preemption import PreemptPolicy, yield_floor

    policy = PreemptPolicy(margin=5, after=2.0)
    urgent = Head("u", 10, ready_at=100.0)
    assert yield_floor(policy, 0, [0], urgent, now=103.0) == 5  # a tie: the one that ended
    assert yield_floor(policy, 3, [0], urgent, now=103.0) is None  # a lower one is running
    assert yield_floor(policy, 6, [], urgent, now=103.0) is None  # within the margin
    assert yield_floor(policy, 0, [], urgent, now=101.0) is None  # not waited long enough
    assert yield_floor(policy, 0, [], None, now=103.0) is None  # nothing ready


def test_reserved_slots_keep_room_for_urgent_work() -> None:
    from conveyor.worker.reserve import Reserve, claim_floor

    reserve = Reserve(priority=8, slots=1)
    assert claim_floor(reserve, 3, []) is None
    assert claim_floor(reserve, 3, [0]) is None
    assert claim_floor(reserve, 3, [0, 2]) == 8  # the ordinary room is full
    assert claim_floor(reserve, 3, [9, 0]) is None  # an urgent task in an ordinary slot
    assert claim_floor(None, 3, [0, 0, 0]) is None


def test_settings_for_priorities_are_checked() -> None:
    from pydantic import ValidationError

    from conveyor.settings import Settings

    settings = Settings(
        worker={"concurrency": 3, "preempt_margin": 5, "reserve": {"priority": 8, "slots": 1}},
        queue={"aging_interval": 30},
    )
    assert settings.worker.reserve is not None and settings.worker.reserve.priority == 8
    assert settings.queue.aging_interval == 30
    with pytest.raises(ValidationError, match=r"must be below worker\.concurrency"):
        Settings(worker={"concurrency": 1, "reserve": {"priority": 8, "slots": 1}})
    with pytest.raises(ValidationError):
        Settings(queue={"aging_interval": 0})
