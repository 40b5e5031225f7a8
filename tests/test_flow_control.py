"""Flow control: per-key concurrency limits, retry lists, permanent errors and hooks.

Store-level tests run on SQLite, Redis and a Redis Cluster (RabbitMQ refuses keyed pushes,
checked here too); the process tests start real ``conveyor worker`` processes on the
``flow_pipeline`` helper and end with a ledger of what ran when. Nothing here assumes a fast
machine: waits poll with deadlines, and the per-key check is on the ledger's intervals.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import backend_params, wait_until
from conveyor import Message, PermanentError, QueueManager, TaskRecord, TaskStatus
from conveyor.errors import TaskValidationError
from conveyor.lifecycle import Event, Op
from conveyor.models import Message as MessageModel
from conveyor.pipeline import Pipeline
from conveyor.retries import check_backoff, decode_backoff, encode_backoff, is_permanent
from conveyor.worker.hooks import MAX_THREADS, HookRunner, hook_name
from conveyor.worker.policy import RetryDefaults, backoff_seconds
from helpers.worker_process import WorkerProcess

MakeQueue = Callable[..., QueueManager]
KEYED = backend_params("sqlite", "redis", "redis-cluster", "postgres")
S = TaskStatus


# -- retry schedules and permanent errors: the pure rules -------------------------------------


def _message(attempts: int, backoff: Any = None) -> Message:
    return MessageModel(task_id="t", data={}, priority=5, queue="q", attempts=attempts,
                        retry_backoff=backoff)  # fmt: skip


def test_a_list_of_delays_is_used_as_written_and_repeats_its_last_entry() -> None:
    delays = (60.0, 300.0, 900.0)
    got = [backoff_seconds(_message(n, delays), None, None, RetryDefaults()) for n in range(1, 6)]
    assert got == [60.0, 300.0, 900.0, 900.0, 900.0]


def test_a_pipeline_or_step_list_applies_when_the_task_sets_none() -> None:
    pipeline = Pipeline("p", retry_backoff=[5, 7])

    @pipeline.step(retry_backoff=[1, 2, 3])
    def one(ctx: Any) -> None: ...

    @pipeline.step
    def two(ctx: Any) -> None: ...

    defaults = RetryDefaults()
    assert backoff_seconds(_message(2), pipeline, "one", defaults) == 2.0
    assert backoff_seconds(_message(3), pipeline, "two", defaults) == 7.0
    assert backoff_seconds(_message(1, 9.0), pipeline, "one", defaults) <= 9.0 * 1.5


def test_a_backoff_list_is_checked_and_survives_the_store_unchanged() -> None:
    assert check_backoff("b", [60, 300]) == (60.0, 300.0)
    assert decode_backoff(encode_backoff((60.0, 300.0))) == (60.0, 300.0)
    assert decode_backoff(2.5) == 2.5 and decode_backoff("2.5") == 2.5
    for bad in ([], [-1], ["x"], [float("inf")]):
        with pytest.raises((ValueError, TypeError)):
            check_backoff("retry_backoff", bad)


def test_permanent_errors_retry_on_and_dont_retry_on() -> None:
    class MineError(PermanentError): ...

    assert is_permanent(MineError(), None, None)
    assert is_permanent(KeyError(), None, (KeyError,))
    assert not is_permanent(RuntimeError(), None, (KeyError,))
    assert is_permanent(ValueError(), (RuntimeError,), None)
    assert not is_permanent(RuntimeError(), (RuntimeError,), None)
    assert not is_permanent(RuntimeError(), None, None)


# -- hooks: the pure rules --------------------------------------------------------------------


def test_each_accepted_outcome_names_its_hook() -> None:
    assert hook_name(Op.ACK, "success") == "on_success"
    assert hook_name(Op.FAIL, "failed") == "on_failure"
    assert hook_name(Op.FAIL, "canceled") == "on_cancel"
    assert hook_name(Op.NACK, "canceled") == "on_cancel"
    assert hook_name(Op.NACK, "scheduled") == "on_retry"
    assert hook_name(Op.NACK, "pending") == "on_retry"
    assert hook_name(Op.HAND_BACK, "pending") is None


def _record() -> TaskRecord:
    return TaskRecord(id="t", queue="q", priority=5, status=S.SUCCESS, created_at=0)  # type: ignore[arg-type]


def test_a_hook_that_raises_or_hangs_never_blocks_and_the_threads_stay_bounded() -> None:
    runner = HookRunner(timeout=0.2)
    calls: list[str] = []
    release = __import__("threading").Event()

    def raises(record: TaskRecord) -> None:
        calls.append("raised")
        raise RuntimeError("hook bug")

    def hangs(record: TaskRecord) -> None:
        release.wait(30)

    assert runner.fire("on_success", raises, _record())
    wait_until(lambda: calls == ["raised"], timeout=5, message="the raising hook ran")
    started = time.monotonic()
    for _ in range(MAX_THREADS):
        assert runner.fire("on_failure", hangs, _record())
    assert time.monotonic() - started < 5, "fire() must not wait for a hook"
    assert not runner.fire("on_retry", hangs, _record()), "a full runner skips the hook"
    assert runner.skipped == 1
    release.set()
    runner.wait(5)
    assert runner.fire("on_retry", lambda record: None, _record()), "room again"


# -- per-key limits in the store ---------------------------------------------------------------


def _reserve_all(queue: QueueManager) -> list[Message]:
    taken = []
    while (message := queue.reserve(timeout=0)) is not None:
        taken.append(message)
    return taken


@pytest.mark.parametrize("backend_name", KEYED)
def test_a_full_key_is_passed_over_and_the_rest_of_the_queue_keeps_its_order(
    make_queue: MakeQueue,
) -> None:
    queue = make_queue()
    for i in range(300):  # far more blocked tasks than any bounded scan would look at
        queue.push(f"busy{i}", {}, 9, concurrency_key="busy", max_concurrency=2)
    queue.push("low", {}, 1)
    queue.push("other1", {}, 5, concurrency_key="other", max_concurrency=1)
    queue.push("plain", {}, 5)
    taken = [m.task_id for m in _reserve_all(queue)]
    assert taken == ["busy0", "busy1", "other1", "plain", "low"]
    assert queue.stats().counts["pending"] == 298
    parked = queue.get_task("busy2")
    assert parked is not None and parked.status == S.PENDING
    assert parked.history[-1].event == Event.PARKED
    assert (parked.concurrency_key, parked.max_concurrency) == ("busy", 2)


@pytest.mark.parametrize("backend_name", KEYED)
def test_every_exit_from_processing_frees_the_slot(make_queue: MakeQueue) -> None:
    queue = make_queue(visibility_timeout=0.5)
    for i in range(9):
        queue.push(f"k{i}", {}, 5, concurrency_key="k", max_concurrency=1)

    def holder() -> Message:
        taken = _reserve_all(queue)
        assert len(taken) == 1, [m.task_id for m in taken]
        return taken[0]

    exits: list[Callable[[Message], Any]] = [
        queue.ack,
        lambda m: queue.fail(m, reason="error"),
        lambda m: queue.nack(m, delay=60),
        lambda m: queue.nack(m, count_attempt=False),  # hand-back: x comes back first
        lambda m: (queue.cancel(m.task_id), queue.nack(m)),  # canceled while it ran
        lambda m: queue.fail(m.task_id, reason="operator"),  # by id
    ]
    for leave in exits:
        message = holder()
        leave(message)
        record = queue.get_task(message.task_id)
        assert record is not None and record.status != S.PROCESSING
    message = holder()  # lease expiry: a holder that died
    deadline = time.monotonic() + 15
    while (following := _reserve_all(queue)) == []:
        assert time.monotonic() < deadline, "the lost lease's slot never came back"
        time.sleep(0.1)
    assert len(following) == 1


@pytest.mark.parametrize("backend_name", KEYED)
def test_a_parked_task_comes_back_at_its_own_place_and_the_smallest_limit_wins(
    make_queue: MakeQueue,
) -> None:
    queue = make_queue()
    queue.push("a1", {}, 5, concurrency_key="a", max_concurrency=3)
    queue.push("a2", {}, 5, concurrency_key="a", max_concurrency=1)
    queue.push("a3", {}, 5, concurrency_key="a", max_concurrency=3)
    queue.push("b1", {}, 5)
    first = _reserve_all(queue)
    # a1 runs (limit 3); a2 asks for 1 and one runs: parked; a3 runs (a1's 3 allows 2)
    assert [m.task_id for m in first] == ["a1", "a3", "b1"]
    queue.push("later", {}, 5)
    for message in first:
        queue.ack(message)
    # a2 comes back at its original place: ahead of "later", pushed after it
    assert [m.task_id for m in _reserve_all(queue)] == ["a2", "later"]


def test_configured_limits_apply_and_the_smaller_one_wins(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    with QueueManager.from_url(url, queue_name="q", key_limits={"*": 3, "vip": 1}) as queue:
        queue.push("v1", {}, concurrency_key="vip")
        queue.push("u1", {}, concurrency_key="user", max_concurrency=2)
        queue.push("u2", {}, concurrency_key="user", max_concurrency=9)
        assert queue.require_task("v1").max_concurrency == 1
        assert queue.require_task("u1").max_concurrency == 2
        assert queue.require_task("u2").max_concurrency == 3
        with pytest.raises(TaskValidationError, match="needs a concurrency_key"):
            queue.push("x", {}, max_concurrency=2)
        with pytest.raises(TaskValidationError, match="max_concurrency"):
            queue.push("x", {}, concurrency_key="k", max_concurrency=0)


@pytest.mark.parametrize("backend_name", backend_params("rabbitmq"))
def test_rabbitmq_refuses_keyed_pushes_with_a_clear_error(make_queue: MakeQueue) -> None:
    queue = make_queue()
    with pytest.raises(TaskValidationError, match="not supported on the RabbitMQ backend"):
        queue.push("k", {}, concurrency_key="user_123", max_concurrency=5)
    assert queue.get_task("k") is None


# -- per-key limits with real workers -----------------------------------------------------------


def _intervals(ledger: Path, killed_at: float | None) -> dict[str, list[tuple[float, float, str]]]:
    """Per key, (start, end, task) of every run; a run its worker's SIGKILL cut ends then."""
    starts: dict[tuple[str, str], float] = {}
    by_key: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for line in ledger.read_text().splitlines():
        kind, task, key, at, pid = line.split()
        if kind == "S":
            starts[(task, pid)] = float(at)
        else:
            by_key[key].append((starts.pop((task, pid)), float(at), task))
    for (task, _pid), started in starts.items():  # cut by the SIGKILL
        assert killed_at is not None, f"{task} started and never ended"
        key = "-" if task.startswith("plain-") else task.split("-")[0]
        by_key[key].append((started, killed_at, task))
    return by_key


def _most_at_once(runs: list[tuple[float, float, str]]) -> int:
    events = sorted([(s, 1) for s, _, _ in runs] + [(e, -1) for _, e, _ in runs])
    most = running = 0
    for _, change in events:  # an end sorts before a start at the same instant
        running += change
        most = max(most, running)
    return most


def _start_workers(url: str, queue_name: str, tmp_path: Path, n: int) -> list[WorkerProcess]:
    return [
        WorkerProcess(
            tmp_path / f"w{i}",
            url,
            "-P",
            "flow_pipeline",
            "-Q",
            queue_name,
            "-c",
            "2",
            env={"CONVEYOR_QUEUE__VISIBILITY_TIMEOUT": "3"},
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("backend_name", backend_params("sqlite", "redis"))
def test_four_workers_keep_every_key_within_its_limit_and_a_sigkill_leaks_no_slot(
    make_queue: MakeQueue, backend_url: str, queue_name: str, tmp_path: Path
) -> None:
    """4 workers x 2 slots; 200 tasks over 5 keys (limit 2) and 100 without a key."""
    ledger = tmp_path / "ledger.txt"
    queue = make_queue()
    keys = [f"key{i}" for i in range(5)]
    items: list[dict[str, Any]] = []
    for i in range(200):
        key = keys[i % 5]
        data = {"ledger": str(ledger), "key": key, "sleep": 0.2}
        items.append({"task_id": f"{key}-{i}", "data": data, "type": "flow",
                      "concurrency_key": key, "max_concurrency": 2})  # fmt: skip
    for i in range(100):
        data = {"ledger": str(ledger), "sleep": 0.05}
        items.append({"task_id": f"plain-{i}", "data": data, "type": "flow"})
    random.Random(7).shuffle(items)
    assert all(queue.push_many(items))
    workers = _start_workers(backend_url, queue_name, tmp_path, 4)
    try:
        wait_until(lambda: ledger.exists() and len(ledger.read_text().splitlines()) > 120,
                   timeout=120, message="a third of the runs")  # fmt: skip
        killed_at = time.time()
        workers[0].proc.send_signal(signal.SIGKILL)
        workers[0].proc.wait(10)

        def finished() -> bool:
            counts = queue.stats().counts
            return counts["success"] == 300

        wait_until(finished, timeout=240, interval=0.5, message="all 300 tasks succeeded")
    finally:
        for worker in workers:
            worker.kill()
    by_key = _intervals(ledger, killed_at)
    most = {key: _most_at_once(by_key[key]) for key in keys}
    plain = sorted(by_key["-"])
    keyed = sorted(run for key in keys for run in by_key[key])
    span = lambda runs: max(e for _, e, _ in runs) - min(s for s, _, _ in runs)  # noqa: E731
    print(
        f"\nper-key ledger [{queue.backend_kind.value}, machine shared and loaded]: most "
        f"running at once per key {most}; unkeyed {len(plain)} runs in {span(plain):.1f}s "
        f"({len(plain) / span(plain):.1f}/s), keyed {len(keyed)} runs in {span(keyed):.1f}s "
        f"({len(keyed) / span(keyed):.1f}/s)"
    )
    assert all(n <= 2 for n in most.values()), most
    cut = {task for runs in by_key.values() for _, end, task in runs if end == killed_at}
    for task in cut:  # the SIGKILLed worker's tasks: their lease ran out, their slot came back
        record = queue.require_task(task)
        assert record.status == S.SUCCESS and Event.LEASE_EXPIRED in [
            e.event for e in record.history
        ]
    assert len({task for _, _, task in keyed}) == 200 and len(plain) >= 100
    # Unkeyed tasks are not held behind keyed ones: all done well before the keyed ones are.
    assert max(e for _, e, _ in plain) < max(e for _, e, _ in keyed)


# -- retries, permanent errors and hooks with a real worker, on every backend -----------------


def _hooks(ledger: Path) -> list[dict[str, Any]]:
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("backend_name", backend_params())
def test_retry_lists_permanent_errors_and_hooks(
    make_queue: MakeQueue, backend_url: str, queue_name: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "hooks.txt"
    queue = make_queue()
    base = {"ledger": str(ledger)}
    cases = {
        "retried": {**base, "raise": "boom", "fail_times": 2},  # [0.1, 0.3] then success
        "exhausted": {**base, "raise": "boom", "fail_times": 9},  # 3 retries, then failed
        "permanent": {**base, "raise": "permanent", "fail_times": 9},
        "dont": {**base, "raise": "key", "fail_times": 9},  # dont_retry_on=KeyError
        "not-on": {**base, "raise": "value", "fail_times": 9, "where": "second"},  # retry_on
        "hook-raises": {**base, "hook_raises": True},
        "canceled": {**base, "sleep": 30},
    }
    for task_id, data in cases.items():
        assert queue.push(task_id, data, type="failing")
    worker = WorkerProcess(tmp_path / "w", backend_url, "-P", "flow_pipeline", "-Q", queue_name,
                           "-c", "4")  # fmt: skip
    try:
        wait_until(lambda: (queue.get_task("canceled") or _record()).status == S.PROCESSING,
                   timeout=60, message="the long task started")  # fmt: skip
        queue.cancel("canceled")
        done = {"retried", "exhausted", "permanent", "dont", "not-on", "hook-raises", "canceled"}

        def settled() -> bool:
            return all(queue.require_task(t).status in (S.SUCCESS, S.FAILED, S.CANCELED)
                       for t in done)  # fmt: skip

        wait_until(settled, timeout=90, message="every task settled")
        wait_until(lambda: {h["id"] for h in _hooks(ledger)} >= done - {"hook-raises"},
                   timeout=30, message="the hooks ran")  # fmt: skip
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    finally:
        worker.kill()
    records = {task_id: queue.require_task(task_id) for task_id in cases}
    assert records["retried"].status == S.SUCCESS and records["retried"].attempts == 3
    history = [e for e in records["retried"].history if e.event == Event.RETRYING]
    assert len(history) == 2
    gaps = [
        (records["retried"].history[i + 1].at - e.at).total_seconds()
        for i, e in enumerate(records["retried"].history)
        if e.event == Event.RETRYING
    ]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.29, gaps  # the list's delays, not doubling
    assert records["exhausted"].status == S.FAILED and records["exhausted"].attempts == 4
    for task_id in ("permanent", "dont", "not-on"):
        record = records[task_id]
        assert (record.status, record.attempts, record.dead_reason) == (
            S.FAILED, 1, "permanent"), (task_id, record)  # fmt: skip
    assert records["hook-raises"].status == S.SUCCESS  # a raising hook changes nothing
    assert records["canceled"].status == S.CANCELED
    seen = [(h["id"], h["hook"], h["status"]) for h in _hooks(ledger)]
    print(f"\nhooks [{queue.backend_kind.value}]: {seen}")
    assert seen.count(("retried", "on_retry", "scheduled")) == 2
    assert seen.count(("retried", "on_success", "success")) == 1
    assert seen.count(("exhausted", "on_retry", "scheduled")) == 3
    assert seen.count(("exhausted", "on_failure", "failed")) == 1
    for task_id in ("permanent", "dont", "not-on"):
        assert [h for h in seen if h[0] == task_id] == [(task_id, "on_failure", "failed")]
    assert [h for h in seen if h[0] == "canceled"] == [("canceled", "on_cancel", "canceled")]
    assert "hook-raises" not in {h[0] for h in seen}
    assert "on_success raised" in worker.log()
