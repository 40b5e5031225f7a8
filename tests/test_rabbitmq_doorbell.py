"""A RabbitMQ worker waits for a push on a doorbell consumer it selects on, not in a claim.

The doorbell is a consumer with prefetch 1 whose delivery writes to a pipe; the worker
waits on that pipe beside its children's pipes and its signal pipe. So an idle worker stops
at once on SIGTERM, a worker with a free slot starts a push without asking the broker every
50 ms, and a slot kept for urgent work leaves ordinary messages in the broker. The
consumers are counted by the broker (a passive declare), the only witness that matters.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest

from conftest import RABBITMQ_URL, Helper, rabbitmq_url, require_rabbitmq_server, wait_until
from conveyor import QueueManager, TaskStatus
from test_doorbell import a_push_starts_beside_the_held_task, hold_a_slot, stops_at_once
from test_worker import StartWorker, wait_status, worker_factory

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def url(tmp_path: Path) -> str:
    require_rabbitmq_server()
    return rabbitmq_url(tmp_path, f"sqlite:///{tmp_path}/store.db")


@pytest.fixture
def queue(url: str, queue_name: str) -> Iterator[QueueManager]:
    manager = QueueManager.from_url(url, queue_name=queue_name)
    yield manager
    manager.clear()
    manager.close()


@pytest.fixture
def start_worker(
    queue: QueueManager, url: str, spawn_helper: Callable[..., Helper]
) -> Iterator[StartWorker]:
    yield from worker_factory(spawn_helper, ["--url", url, "--queue", queue.queue_name])


def _broker_queue(queue: QueueManager) -> tuple[int, int]:
    """(ready messages, consumers) of the queue's broker queue, as the broker counts them."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        declared = connection.channel().queue_declare(f"conveyor.{queue.queue_name}", passive=True)
        return declared.method.message_count, declared.method.consumer_count
    finally:
        connection.close()


@pytest.mark.parametrize("how", ["SIGTERM", "conveyor stop"])
def test_an_idle_rabbitmq_worker_stops_at_once(
    how: str, queue: QueueManager, start_worker: StartWorker
) -> None:
    """Blocked in a claim, the worker heard the signal but waited on for the rest of the
    claim's block (here 20 s, to the next heartbeat); on the doorbell's pipe the wait ends
    at once. A stop request is heard at a heartbeat, which an idle wait no longer outlasts
    on a backend whose heartbeats the loop sends (it waited the whole 30 s block)."""
    heartbeat = 20 if how == "SIGTERM" else 0.2
    worker = start_worker(concurrency=1, idle_block=30, heartbeat=heartbeat)
    wait_until(lambda: _broker_queue(queue)[1] == 1, 30, message="the doorbell consumer")
    stops_at_once(how, worker, queue)
    assert _broker_queue(queue)[1] == 0


def test_a_free_slot_waits_on_a_doorbell_consumer_and_starts_a_push(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    """With one slot busy, the free one waits on a consumer (it used to ask the broker for
    the head every 50 ms); a push starts while the other task still runs."""
    worker = start_worker(concurrency=2, idle_block=0.5)
    hold_a_slot(queue, tmp_path)
    wait_until(lambda: _broker_queue(queue)[1] == 1, 30, message="a doorbell consumer")
    a_push_starts_beside_the_held_task(queue, worker, tmp_path)


def test_a_reserved_slot_leaves_ordinary_work_in_the_broker(
    queue: QueueManager, start_worker: StartWorker, tmp_path: Path
) -> None:
    """A slot kept for priority 8 and up has no doorbell (it would ring for any message):
    an ordinary push stays ready in the broker, for other workers, until a slot may take
    it; an urgent one starts in the reserved slot."""
    worker = start_worker(concurrency=2, reserve="8:1", idle_block=0.5)
    hold_a_slot(queue, tmp_path)
    queue.push("ordinary", {"dir": str(tmp_path), "seconds": 0}, 0, type="sleepy")
    wait_until(lambda: _broker_queue(queue) == (1, 0), 30, message="ordinary ready, no consumer")
    deadline = time.monotonic() + 1.0  # a window: the message stays in the broker meanwhile
    while time.monotonic() < deadline:
        assert _broker_queue(queue) == (1, 0), "a held-back slot took an ordinary message"
    queue.push("urgent", {"dir": str(tmp_path), "seconds": 0}, 9, type="sleepy")
    wait_status(queue, "urgent", TaskStatus.SUCCESS, worker=worker)
    assert queue.get_task("ordinary").status == TaskStatus.PENDING  # type: ignore[union-attr]
    (tmp_path / "held.go").touch()
    wait_status(queue, "ordinary", TaskStatus.SUCCESS, worker=worker)
    wait_status(queue, "held", TaskStatus.SUCCESS, worker=worker)


def _take(queue: QueueManager, task_id: str, min_priority: int | None = None) -> None:
    """Reserve (without blocking) and ack the task expected at the head."""
    message = queue.reserve(timeout=0, min_priority=min_priority)
    assert message is not None and message.task_id == task_id, message
    queue.ack(message)


def _rings(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _rung_with(queue: QueueManager, task_id: str, priority: int) -> None:
    """Subscribe the doorbell, push a task and wait until the doorbell holds its message."""
    assert queue.reserve(timeout=0) is None
    fd = queue.doorbell(5.0)
    assert fd is not None
    wait_until(lambda: _broker_queue(queue)[1] == 1, 30, message="the doorbell consumer")
    assert queue.push(task_id, {}, priority)
    wait_until(lambda: _rings(fd), 30, message="the doorbell to ring")
    queue.heard_doorbell()
    assert _broker_queue(queue) == (0, 0), "the doorbell's message is not held here"


def test_a_withdrawn_doorbell_gives_back_the_message_it_received(queue: QueueManager) -> None:
    """A worker that fills up (or stops) before claiming what its doorbell received must
    not keep it unacked: no other consumer could have it meanwhile."""
    _rung_with(queue, "rung", 3)
    queue.withdraw_doorbell()
    wait_until(lambda: _broker_queue(queue) == (1, 0), 30, message="the message given back")
    _take(queue, "rung")


def test_a_reserved_slot_claims_the_urgent_task_not_the_message_a_doorbell_holds(
    queue: QueueManager,
) -> None:
    """The doorbell received an ordinary message; then an urgent task came. A claim with a
    floor takes the urgent one (the store's ticket claim does not look at priorities, so
    a held message below the floor goes back), and the ordinary one waits in the broker."""
    _rung_with(queue, "ordinary", 0)
    assert queue.push("urgent", {}, 9)
    _take(queue, "urgent", min_priority=8)
    wait_until(lambda: _broker_queue(queue) == (1, 0), 30, message="ordinary back in line")
    _take(queue, "ordinary")


def test_a_blocking_reserve_with_a_floor_leaves_ordinary_messages_alone(
    queue: QueueManager,
) -> None:
    """Waiting for urgent work, a blocking reserve looks at the store's head; it does not
    subscribe a doorbell, which would take the ordinary head, give it back and take it
    again for the whole wait. The broker never delivered the message: not redelivered."""
    assert queue.push("ordinary", {}, 0)
    assert queue.reserve(timeout=0.5, min_priority=8) is None
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        method, _, _ = channel.basic_get(f"conveyor.{queue.queue_name}", auto_ack=False)
        assert method is not None and not method.redelivered, "a consumer had the message"
        channel.basic_reject(method.delivery_tag, requeue=True)
    finally:
        connection.close()
    message = queue.reserve(timeout=5)
    assert message is not None and message.task_id == "ordinary"
    queue.ack(message)
