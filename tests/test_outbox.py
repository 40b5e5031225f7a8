"""The worker's outbox and outage watch, on a real SQLite queue (no broker needed).

The outbox keeps at most the latest progress, the latest checkpoint and one final outcome
per held task; sends them in one settle with claims riding along; keeps them when the
backend does not answer; and counts a final outcome that fencing refused as a duplicate
run. The outage watch logs one line when the backend goes and one when it is back, and
paces its tries with the reconnect backoff.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loguru import logger

from conveyor import BrokerAuthenticationError, BrokerUnavailableError, Message, QueueManager
from conveyor import outcomes as build
from conveyor.worker.backoff import Backoff
from conveyor.worker.outage import OutageWatch
from conveyor.worker.outbox import Outbox
from helpers.private_redis import PrivateRedis


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[QueueManager]:
    manager = QueueManager.from_url(f"sqlite:///{tmp_path}/q.db", queue_name="ob")
    yield manager
    manager.close()


@pytest.fixture
def lines() -> Iterator[list[str]]:
    captured: list[str] = []
    sink = logger.add(lambda message: captured.append(str(message)), level="INFO")
    yield captured
    logger.remove(sink)


def outbox() -> Outbox:
    return Outbox(lambda message: logger.bind(task_id=message.task_id))


def leased(queue: QueueManager, count: int) -> list[Message]:
    queue.push_many([(f"t{i}", {"n": i}, 5) for i in range(count)])
    found = [queue.reserve() for _ in range(count)]
    assert all(found)
    return [message for message in found if message is not None]


def test_the_outbox_keeps_the_latest_progress_and_checkpoint_and_one_final_per_task(
    queue: QueueManager,
) -> None:
    box = outbox()
    first, second = leased(queue, 2)
    for fraction in (0.1, 0.5, 0.9):
        box.put(queue, first, build.progress(first, fraction, f"at {fraction}"))
    box.put(queue, first, build.checkpoint(first, {"a": 1}, 1000, 20))
    box.put(queue, first, build.checkpoint(first, {"a": 1, "b": 2}, 1000, 20))
    box.put(queue, first, build.ack(first, {"done": True}, 1000, 20))
    box.put(queue, second, build.progress(second, 0.3))
    assert len(box) == 4  # progress, checkpoint, ack of the first; progress of the second
    claimed = box.send(queue, claim=1)
    assert not box and claimed == []  # nothing else is pending
    record = queue.require_task(first.task_id)
    assert record.status.value == "success" and record.result == {"done": True}
    assert queue.require_task(second.task_id).progress == 0.3


def test_sending_rides_claims_along_and_a_refused_final_is_counted_as_a_duplicate(
    queue: QueueManager, lines: list[str]
) -> None:
    box = outbox()
    message = leased(queue, 1)[0]
    assert queue.nack(message)  # the lease is gone: another delivery will run it again
    queue.push("next", {"n": 9}, 5)
    box.put(queue, message, build.ack(message, None, 1000, 20), ran=0.25)
    claimed = box.send(queue, claim=2)
    assert box.refused == 1
    assert sorted(m.task_id for m in claimed) == ["next", "t0"]
    assert any("result was refused: the lease was lost" in line for line in lines)


def test_outcomes_wait_while_redis_is_down_and_go_out_once_it_is_back(
    private_redis: Callable[..., PrivateRedis],
) -> None:
    server = private_redis("--appendonly", "yes", "--appendfsync", "always")
    queue = QueueManager.from_url(server.url, queue_name="ob", connect_timeout=1)
    try:
        box = outbox()
        message = leased(queue, 1)[0]
        box.put(queue, message, build.ack(message, {"ok": 1}, 1000, 20))
        server.kill()
        with pytest.raises(BrokerUnavailableError):
            box.send(queue)
        assert len(box) == 1  # kept, to send again
        server.start()
        assert box.send(queue) == [] and not box and box.refused == 0
        assert queue.require_task(message.task_id).result == {"ok": 1}
    finally:
        queue.close()


def test_the_outage_watch_says_one_line_each_way_and_paces_its_tries(
    lines: list[str],
) -> None:
    watch = OutageWatch("redis://host:6379/0", Backoff(0.1, 1.0))
    assert watch.up and watch.may_try()
    for _ in range(5):
        watch.lost(BrokerUnavailableError("connection refused"))
    assert not watch.up and not watch.may_try()
    assert 0.0 < watch.until_next_try() <= 1.0
    watch.lost(BrokerAuthenticationError("WRONGPASS"))
    watch.lost(BrokerAuthenticationError("WRONGPASS"))
    assert watch.answered(waiting=3) >= 0.0 and watch.up
    text = "\n".join(lines)
    assert text.count("does not answer") == 1 and text.count("Running tasks carry on") == 2
    assert text.count("refused the worker's credentials") == 1  # loudly, once an outage
    assert text.count("answers again after") == 1 and "sending 3 waiting" in text
