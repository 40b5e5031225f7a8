"""Faults caused for real with other processes: concurrent consumers, SIGKILL, SIGSTOP.

The consumers are ``tests/helpers/consumer.py`` run with ``sys.executable``; they record
what they consumed in files outside the queue (the ledger of RELIABILITY.md), so the
verdict never depends on the queue reporting on itself.
"""

from __future__ import annotations

import itertools
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Helper, wait_until
from conveyor import Message, QueueManager, TaskStatus

SpawnHelper = Callable[..., Helper]
MakeQueue = Callable[..., QueueManager]


def reserve_soon(queue: QueueManager, timeout: float = 10.0) -> Message:
    message: Message = wait_until(
        lambda: queue.reserve(timeout=0.2), timeout, message="a task to reserve"
    )
    return message


def consumer(spawn_helper: SpawnHelper, mode: str, url: str, queue_name: str, *args: str) -> Helper:
    return spawn_helper("consumer.py", mode, "--url", url, "--queue", queue_name, *args)


# -- 5. concurrent consumers ----------------------------------------------------------------


@pytest.mark.slow
def test_four_processes_reserving_concurrently_get_every_task_exactly_once(
    queue: QueueManager,
    backend_url: str,
    queue_name: str,
    spawn_helper: SpawnHelper,
    tmp_path: Path,
) -> None:
    rng = random.Random(5)
    ids = [f"job-{i:05d}" for i in range(2000)]
    for start in range(0, len(ids), 500):
        batch = [
            (task_id, {"n": start + k}, rng.randint(0, 10))
            for k, task_id in enumerate(ids[start : start + 500])
        ]
        assert queue.push_many(batch) == [True] * 500
    outs = [tmp_path / f"consumer-{k}.txt" for k in range(4)]
    helpers = [
        consumer(spawn_helper, "drain", backend_url, queue_name, "--out", str(out), "--idle", "1")
        for out in outs
    ]
    for helper in helpers:  # all four are connected before any starts: they really overlap
        helper.expect("READY", timeout=30)
    for helper in helpers:
        helper.send("go")
    reported = [int(helper.expect("DONE", timeout=120)) for helper in helpers]
    assert [helper.wait() for helper in helpers] == [0, 0, 0, 0]

    lines = [out.read_text().split("\n")[:-1] if out.exists() else [] for out in outs]
    got = [line.split()[0] for per_process in lines for line in per_process]
    refused = [line for per_process in lines for line in per_process if not line.endswith(" True")]
    print(f"tasks per process: {[len(per_process) for per_process in lines]}")
    assert refused == [], "a consumer's ack was refused, so its lease was lost mid-test"
    duplicates = sorted(task_id for task_id, n in Counter(got).items() if n > 1)
    assert duplicates == [], f"{len(duplicates)} delivered twice, e.g. {duplicates[:5]}"
    assert set(got) == set(ids), f"missing: {sorted(set(ids) - set(got))[:5]}"
    assert sum(reported) == len(ids)
    assert queue.get_queue_length() == 0
    assert queue.stats().counts["success"] == len(ids)


# -- 6. SIGKILL -----------------------------------------------------------------------------


def test_task_held_by_a_process_killed_with_sigkill_is_delivered_again(
    make_queue: MakeQueue, backend_url: str, queue_name: str, spawn_helper: SpawnHelper
) -> None:
    queue = make_queue(visibility_timeout=30)
    assert queue.push("orphan", {"x": 1}, priority=5)
    helper = consumer(spawn_helper, "hold", backend_url, queue_name, "--visibility-timeout", "1")
    assert helper.expect("RESERVED").split() == ["orphan", "1"]
    helper.signal(signal.SIGKILL)
    assert helper.wait() == -signal.SIGKILL

    message = reserve_soon(queue)
    assert message.task_id == "orphan"
    assert message.attempts == 2
    assert message.data == {"x": 1}
    assert queue.ack(message) is True
    record = queue.get_task("orphan")
    assert record is not None and record.status == TaskStatus.SUCCESS and record.attempts == 2


# -- 7. SIGSTOP -----------------------------------------------------------------------------


def test_holder_paused_past_its_lease_cannot_settle_the_task_someone_else_now_holds(
    make_queue: MakeQueue, backend_url: str, queue_name: str, spawn_helper: SpawnHelper
) -> None:
    queue = make_queue(visibility_timeout=30)
    assert queue.push("paused", {"x": 2}, priority=5)
    helper = consumer(
        spawn_helper, "late-ack", backend_url, queue_name, "--visibility-timeout", "1"
    )
    assert helper.expect("RESERVED").split() == ["paused", "1"]
    helper.signal(signal.SIGSTOP)  # a GC pause, a swapped-out VM: the holder's lease runs out

    message = reserve_soon(queue)
    assert message.task_id == "paused" and message.attempts == 2

    helper.signal(signal.SIGCONT)
    helper.send("ack")
    assert helper.expect("ACK") == "False", "the late ack was accepted"
    assert helper.expect("EXTEND") == "False", "the late extend was accepted"
    assert helper.expect("NACK") == "False", "the late nack was accepted"
    assert helper.wait() == 0

    record = queue.get_task("paused")
    assert record is not None
    assert record.status == TaskStatus.PROCESSING, "the late settle changed the new holder's task"
    assert record.attempts == 2 and record.result is None
    assert queue.get_queue_length() == 0
    assert queue.ack(message, result={"by": "test"}) is True
    record = queue.get_task("paused")
    assert record is not None
    assert record.status == TaskStatus.SUCCESS and record.result == {"by": "test"}


# -- 12. the ledger -------------------------------------------------------------------------


class Ledger:
    """Two consumer slots that SIGKILL themselves mid-task ~10% of the time and are restarted.

    Each consumer appends ``<id> <attempt> <pid>`` to the ledger file when it has done a
    task's work and before it acks, so the file records executions independently of the queue.
    """

    def __init__(
        self, spawn_helper: SpawnHelper, url: str, queue_name: str, path: Path, take: str
    ) -> None:
        self.path = path
        self.path.touch()
        self.kills = 0
        self._seeds = itertools.count(1)
        self._start = lambda: consumer(
            spawn_helper,
            "ledger",
            url,
            queue_name,
            "--visibility-timeout",
            "1",
            "--max-deliveries",
            "50",
            "--out",
            str(path),
            "--kill-rate",
            "0.1",
            "--take",
            take,
            "--seed",
            str(next(self._seeds)),
        )
        self.slots = [self._start(), self._start()]

    def restart_dead(self) -> None:
        for k, helper in enumerate(self.slots):
            code = helper.proc.poll()
            if code is None:
                continue
            assert code == -signal.SIGKILL, f"consumer exited {code}; stderr:\n{helper.stderr()}"
            self.kills += 1
            helper.stop()
            self.slots[k] = self._start()

    def run_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"deadline passed; {self.summary()}"
            self.restart_dead()
            time.sleep(0.05)

    def stop(self) -> None:
        for helper in self.slots:
            helper.expect("READY", timeout=30)  # its SIGTERM handler is installed by now
            helper.signal(signal.SIGTERM)
        for helper in self.slots:
            assert helper.wait() in (0, -signal.SIGKILL), helper.stderr()

    def executed(self) -> list[str]:
        return [line.split()[0] for line in self.path.read_text().split("\n")[:-1]]

    def summary(self) -> str:
        executed = self.executed()
        return f"{len(executed)} executions of {len(set(executed))} ids, {self.kills} kills"


@pytest.mark.slow
def test_ledger_shows_nothing_lost_when_consumers_are_killed_mid_task(
    make_queue: MakeQueue,
    backend_url: str,
    queue_name: str,
    spawn_helper: SpawnHelper,
    tmp_path: Path,
) -> None:
    queue = make_queue()
    enqueued = {f"L-{i:04d}" for i in range(300)}
    assert (
        queue.push_many(
            [(task_id, {"id": task_id}, i % 11) for i, task_id in enumerate(sorted(enqueued))]
        )
        == [True] * 300
    )
    ledger = Ledger(spawn_helper, backend_url, queue_name, tmp_path / "ledger.txt", "reserve")

    def complete() -> bool:
        return enqueued <= set(ledger.executed()) and queue.stats().counts["success"] == 300

    ledger.run_until(complete, timeout=120)
    ledger.stop()

    executed = ledger.executed()
    lost = enqueued - set(executed)
    unexpected = set(executed) - enqueued
    duplicates = {task_id: n for task_id, n in Counter(executed).items() if n > 1}
    print(
        f"ledger: lost={len(lost)} unexpected={len(unexpected)} "
        f"duplicated={len(duplicates)} ({sum(duplicates.values()) - len(duplicates)} extra "
        f"runs); {ledger.summary()}"
    )
    assert lost == set()
    assert unexpected == set()
    assert ledger.kills > 0, "no consumer was killed: the fault was never caused"
    counts = queue.stats().counts
    assert counts["success"] == 300 and counts["failed"] == 0 and counts["processing"] == 0


@pytest.mark.slow
def test_ledger_check_reports_loss_for_an_at_most_once_consumer(
    make_queue: MakeQueue,
    backend_url: str,
    queue_name: str,
    spawn_helper: SpawnHelper,
    tmp_path: Path,
) -> None:
    """The same check must bite: consumers that ``pull`` (at-most-once) and die lose tasks."""
    queue = make_queue()
    enqueued = {f"P-{i:04d}" for i in range(200)}
    assert (
        queue.push_many([(task_id, i, 5) for i, task_id in enumerate(sorted(enqueued))])
        == [True] * 200
    )
    ledger = Ledger(spawn_helper, backend_url, queue_name, tmp_path / "ledger.txt", "pull")
    ledger.run_until(lambda: queue.get_queue_length() == 0, timeout=120)
    ledger.stop()

    lost = enqueued - set(ledger.executed())
    records = {task_id: queue.get_task(task_id) for task_id in lost}
    stuck = {task_id for task_id, r in records.items() if r and r.status == TaskStatus.PROCESSING}
    print(f"at-most-once ledger: lost={len(lost)}; {ledger.summary()}")
    assert ledger.kills > 0
    assert lost, "the ledger did not notice tasks lost with their consumer"
    assert lost <= stuck, "every lost task is one that was taken and never finished"
