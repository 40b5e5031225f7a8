"""What only the RabbitMQ backend has to prove, against the real broker (no mocks).

Heartbeats while a long task runs, a broker that closes every connection mid-drain, broker
priority through a consumer, the seed's batch push, the consumer-timeout refusal, clear
errors, and the task store's recovery of a push whose producer died before publishing.
Every test runs over both task stores (SQLite and Redis) unless it is about the broker
alone. The conformance suite (``test_conformance.py``) covers everything shared.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import (
    RABBITMQ_URL,
    REDIS_URL,
    Helper,
    close_rabbitmq_connection,
    rabbitmq_url,
    rabbitmqctl_rows,
    require_rabbitmq_server,
    require_redis_server,
    wait_until,
)
from conveyor import (
    BrokerUnavailableError,
    ConfigError,
    Message,
    Pipeline,
    PipelineService,
    QueueBackend,
    QueueManager,
    StepContext,
    TaskStatus,
    TaskValidationError,
    TaskWorker,
)
from conveyor.backends import NewTask, StoreConfig

pytestmark = pytest.mark.rabbitmq

MakeQueue = Callable[..., QueueManager]
SpawnHelper = Callable[..., Helper]


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    """The task store under the broker: a SQLite file, or the test Redis."""
    return str(request.param)


@pytest.fixture
def backend_name() -> str:
    return "rabbitmq"


@pytest.fixture
def backend_url(store: str, tmp_path: Path) -> str:
    require_rabbitmq_server()
    if store == "redis":
        require_redis_server()
        return rabbitmq_url(tmp_path, REDIS_URL)
    return rabbitmq_url(tmp_path, f"sqlite:///{tmp_path}/store.db")


def broker_connections(name_prefix: str) -> dict[str, str]:
    """``connection_name`` -> broker pid of the connections whose name starts with a prefix."""
    found = {}
    marker = '{"connection_name","'
    for pid, properties in rabbitmqctl_rows("list_connections", "pid", "client_properties"):
        if marker in properties:
            name = properties.split(marker, 1)[1].split('"', 1)[0]
            if name.startswith(name_prefix):
                found[name] = pid
    return found


def heartbeat_of(name: str) -> int:
    """The heartbeat timeout (s) the broker negotiated with one connection."""
    for timeout, properties in rabbitmqctl_rows("list_connections", "timeout", "client_properties"):
        if f'{{"connection_name","{name}"}}' in properties:
            return int(timeout)
    raise AssertionError(f"no connection named {name!r}")


def ready_messages(queue_name: str) -> int:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        declared = connection.channel().queue_declare(queue_name, passive=True)
        return int(declared.method.message_count)
    finally:
        connection.close()


def drain(queue: QueueManager) -> list[Message]:
    """Take every task with ``reserve`` + ``ack_and_reserve``, as the worker does."""
    taken: list[Message] = []
    message = queue.reserve(timeout=2)
    while message is not None:
        taken.append(message)
        acked, message = queue.ack_and_reserve(message)
        assert acked is True
    return taken


# -- heartbeats -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite"])
def test_heartbeat_2s_and_a_15s_task_is_acked_on_the_connection_it_started_on(
    make_queue: MakeQueue, backend_url: str, queue_name: str, spawn_helper: SpawnHelper
) -> None:
    assert "heartbeat=2" in backend_url, "the test is only meaningful with a short heartbeat"
    # A real TaskWorker runs a 15 s step in its child process...
    worker_queue = make_queue()
    assert worker_queue.push("in-the-worker", {"n": 1}, priority=5)
    worker = spawn_helper(
        "rabbitmq_worker.py", "--url", backend_url, "--queue", queue_name, "--sleep", "15"
    )
    worker_connection = worker.expect("READY", timeout=30)
    # ... while this process holds a task for 15 s and calls nothing at all meanwhile.
    holder = make_queue(queue_name=f"{queue_name}-h")
    assert holder.push("in-this-process", {"n": 2}, priority=5)
    message = holder.reserve(timeout=5)
    assert message is not None
    name = holder.server.link.name  # type: ignore[attr-defined]
    assert heartbeat_of(name) == 2 and heartbeat_of(worker_connection) == 2
    before = broker_connections(name)
    time.sleep(15)  # the subject: only the link's I/O thread touches the connection

    assert holder.ack(message, result="held 15 s") is True
    assert holder.server.link.reconnects == 0  # type: ignore[attr-defined]
    assert broker_connections(name) == before, "the holder's connection was replaced"
    record = holder.get_task("in-this-process")
    assert record is not None and record.status == TaskStatus.SUCCESS and record.attempts == 1

    assert worker.expect("RECONNECTS", timeout=60) == "0"
    assert worker.wait(timeout=30) == 0
    record = worker_queue.get_task("in-the-worker")
    assert record is not None and record.status == TaskStatus.SUCCESS, worker.stderr()
    assert record.attempts == 1 and record.result == 15.0
    assert record.finished_at and record.started_at
    assert (record.finished_at - record.started_at).total_seconds() >= 15


# -- faults ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_close_all_connections_mid_drain_of_2000_tasks_loses_nothing(
    make_queue: MakeQueue,
    backend_url: str,
    queue_name: str,
    spawn_helper: SpawnHelper,
    tmp_path: Path,
) -> None:
    queue = make_queue()
    rng = random.Random(2000)
    enqueued = [f"D-{i:04d}" for i in range(2000)]
    for start in range(0, 2000, 500):
        batch = [(task_id, {"i": start + k}, rng.randint(0, 10))
                 for k, task_id in enumerate(enqueued[start : start + 500])]  # fmt: skip
        assert queue.push_many(batch) == [True] * 500
    ledger = tmp_path / "ledger.txt"
    ledger.touch()
    consumer = spawn_helper(
        "consumer.py", "ledger", "--url", backend_url, "--queue", queue_name, "--out",
        str(ledger), "--max-deliveries", "50",
    )  # fmt: skip
    consumer.expect("READY", timeout=30)

    def executed() -> list[str]:
        return [line.split()[0] for line in ledger.read_text().split("\n")[:-1]]

    wait_until(lambda: len(executed()) >= 500, timeout=60, message="500 tasks executed")
    prefix = f"conveyor pid {consumer.pid} "
    before = broker_connections(prefix)
    assert before, "the consumer's connection is not listed"
    subprocess.run(
        ["rabbitmqctl", "close_all_connections", "test_rabbitmq: close every connection"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    done_at_close = len(executed())

    wait_until(
        lambda: queue.stats().counts["success"] == 2000,
        timeout=180,
        message=lambda: f"2000 successes; {queue.stats().counts}",
    )
    after = broker_connections(prefix)
    assert after and not set(after.values()) & set(before.values()), "it never reconnected"
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(timeout=30) == 0, consumer.stderr()

    runs = executed()
    lost = set(enqueued) - set(runs)
    unexpected = set(runs) - set(enqueued)
    duplicates = {task_id: n for task_id, n in Counter(runs).items() if n > 1}
    print(
        f"close_all_connections after {done_at_close} of 2000: lost={len(lost)} "
        f"unexpected={len(unexpected)} duplicated={len(duplicates)} "
        f"({sum(duplicates.values()) - len(duplicates)} extra runs)"
    )
    assert lost == set(), f"lost: {sorted(lost)[:5]}"
    assert unexpected == set()
    assert done_at_close < 2000, "the drain had finished before the fault: nothing was tested"
    counts = queue.stats().counts
    assert counts["processing"] == 0 and counts["failed"] == 0 and counts["pending"] == 0
    assert ready_messages(f"conveyor.{queue_name}") == 0


def test_a_task_whose_producer_died_before_publishing_is_published_by_a_consumer(
    make_queue: MakeQueue, queue_name: str
) -> None:
    queue = make_queue()
    task_store = queue.server.task_store  # type: ignore[attr-defined]  # a RabbitMQServer's
    store = task_store.store(queue_name, StoreConfig(broker_leases=True, publish_grace=0.3))
    # The producer wrote the record and died before the broker had its message.
    staged = store.enqueue([NewTask("orphan", 5, '{"x": 1}')])
    assert staged.stored == [True] and staged.tickets
    record = queue.get_task("orphan")
    assert record is not None and record.status == TaskStatus.PENDING
    message = wait_until(lambda: queue.reserve(timeout=0.2), 10, message="the orphan published")
    assert message.task_id == "orphan" and message.data == {"x": 1} and message.attempts == 1
    assert queue.ack(message) is True
    record = queue.get_task("orphan")
    assert record is not None and "republished" in [event.event for event in record.history]
    assert queue.reserve(timeout=0.3) is None


def test_a_message_that_is_not_a_ticket_goes_to_the_dead_queue_and_tasks_keep_flowing(
    make_queue: MakeQueue, queue_name: str
) -> None:
    import pika

    queue = make_queue()
    assert queue.push_many([("low", 1, 1), ("high", 2, 8)]) == [True, True]
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        for body in (b"not json{", b'{"id": 5}', b"[1, 2]"):
            properties = pika.BasicProperties(priority=10, delivery_mode=2)
            channel.basic_publish("", f"conveyor.{queue_name}", body, properties)
    finally:
        connection.close()
    assert [message.task_id for message in drain(queue)] == ["high", "low"]
    assert wait_until(lambda: ready_messages(f"conveyor.{queue_name}.dead") == 3, 5)


def test_another_copy_of_a_running_tasks_message_is_dropped_even_when_redelivered(
    make_queue: MakeQueue, queue_name: str
) -> None:
    import pika

    holder = make_queue()
    other = make_queue()
    assert holder.push("task", {"n": 1}, priority=5)
    first = holder.reserve(timeout=1)
    assert first is not None and first.attempts == 1
    # A second copy of its ticket, as a republish after a lost confirm makes, which someone
    # took and gave back unsettled: the broker flags it redelivered, like a dead holder's.
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        body = b'{"id": "task", "ticket": 1, "copy": "another-copy"}'
        properties = pika.BasicProperties(priority=5, delivery_mode=2)
        channel.basic_publish("", f"conveyor.{queue_name}", body, properties)
        method, _, _ = channel.basic_get(f"conveyor.{queue_name}")
        assert method is not None and method.redelivered is False
    finally:
        connection.close()  # unsettled: requeued, flagged redelivered

    assert other.reserve(timeout=0.5) is None, "a copy was taken for the holder's death"
    record = other.get_task("task")
    assert record is not None and record.status == TaskStatus.PROCESSING
    assert record.attempts == 1 and "redelivered" not in [e.event for e in record.history]
    assert holder.extend(first) is True and holder.ack(first) is True
    assert ready_messages(f"conveyor.{queue_name}") == 0


# -- order ----------------------------------------------------------------------------------


def test_priority_holds_through_a_consumer_500_random_priorities(make_queue: MakeQueue) -> None:
    producer = make_queue()
    rng = random.Random(500)
    plan = [(f"r-{i:03d}", {"i": i}, rng.randint(0, 10)) for i in range(500)]
    for start in range(0, 500, 100):
        if start % 200 == 0:
            assert producer.push_many(plan[start : start + 100]) == [True] * 100
        else:
            for task_id, data, priority in plan[start : start + 100]:
                assert producer.push(task_id, data, priority)
    consumer = make_queue()  # one consumer on its own connection: one unacked message at a time
    taken = drain(consumer)
    expected = [task_id for _, task_id, _ in sorted(
        ((-priority, task_id, i) for i, (task_id, _, priority) in enumerate(plan)),
        key=lambda item: (item[0], item[2]),
    )]  # fmt: skip
    assert [message.task_id for message in taken] == expected
    assert consumer.get_queue_length() == 0


def test_the_seeds_constructor_batch_push_and_a_mixed_backlog_come_out_in_order(
    queue_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_rabbitmq_server()
    # The seed's constructor, unchanged: the task store is then the default, a SQLite file
    # in the working directory.
    monkeypatch.chdir(tmp_path)
    queue = QueueManager(
        backend=QueueBackend.RABBITMQ, rabbitmq_url=RABBITMQ_URL, queue_name=queue_name
    )
    try:
        backlog = [(f"backlog-{i}", {"n": i}, [1, 5, 9, 3, 7][i % 5]) for i in range(30)]
        for task_id, data, priority in backlog:
            assert queue.push(task_id, data, priority) is True
        batch = [
            (f"meeting-{i}", {"audio_files": [f"meeting-{i}.wav"], "meeting_type": "weekly_sync"},
             i % 11)
            for i in range(50)
        ]  # fmt: skip
        assert queue.push_many(batch) == [True] * 50
        assert queue.get_queue_length() == 80
        pushed = backlog + batch
        expected = [
            task_id
            for _, task_id in sorted(
                ((-priority, index), task_id) for index, (task_id, _, priority) in enumerate(pushed)
            )
        ]
        by_id = {task_id: (data, priority) for task_id, data, priority in pushed}
        got = []
        while (message := queue.pull(timeout=1)) is not None:  # the seed's consumer loop
            got.append(message["task_id"])
            assert (message["data"], message["priority"]) == by_id[message["task_id"]]
        assert got == expected
        assert (tmp_path / "conveyor-rabbitmq.db").is_file()
    finally:
        queue.clear()
        queue.close()


# -- refusing and explaining ----------------------------------------------------------------


def test_a_hard_time_limit_above_the_consumer_timeout_is_refused_naming_both(
    make_queue: MakeQueue, backend_url: str, queue_name: str
) -> None:
    queue = make_queue()
    with pytest.raises(TaskValidationError) as caught:
        queue.push("too-long", {}, process_timeout=3600)
    assert caught.value.field == "process_timeout"
    assert "3600s" in str(caught.value) and "1800s" in str(caught.value)
    assert queue.get_task("too-long") is None and queue.get_queue_length() == 0
    assert queue.push("just-fits", {}, process_timeout=1800) is True

    slow = Pipeline("slow")

    @slow.step(timeout=1200)
    def first(ctx: StepContext) -> None: ...

    @slow.step(timeout=1200)
    def second(ctx: StepContext) -> None: ...

    worker = TaskWorker(queue, PipelineService([slow]), max_shutdown_wait=1)
    with pytest.raises(ConfigError) as refused:
        worker.start()
    assert "pipeline 'slow'" in str(refused.value)
    assert "2400s" in str(refused.value) and "1800s" in str(refused.value)
    assert queue.get_task("just-fits").status == TaskStatus.PENDING  # type: ignore[union-attr]

    # Tell Conveyor the broker's real timeout and the same limit is accepted.
    other = QueueManager.from_url(f"{backend_url}&consumer_timeout=7200", queue_name=queue_name)
    try:
        assert other.push("too-long", {}, process_timeout=3600) is True
    finally:
        other.close()


def test_a_queue_declared_with_other_arguments_is_a_clear_error(
    make_queue: MakeQueue, queue_name: str
) -> None:
    make_queue(max_priority=5)
    with pytest.raises(ConfigError) as caught:
        make_queue(max_priority=10)
    text = str(caught.value)
    assert f"'conveyor.{queue_name}'" in text and "already exists with other arguments" in text
    assert "x-max-priority" in text and "max_priority=10" in text
    assert f"rabbitmqctl delete_queue conveyor.{queue_name}" in text
    assert "guest:***@" in text and "guest:guest" not in text


def test_a_broker_that_is_down_is_a_clear_error_with_the_password_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as caught:
        QueueManager.from_url("amqp://guest:s3cret-pw@127.0.0.1:1/", connect_timeout=2)
    text = str(caught.value)
    assert "s3cret-pw" not in text and "amqp://guest:***@127.0.0.1:1/" in text
    assert "rabbitmq-server" in text
    assert time.monotonic() - started < 10


def test_wrong_credentials_are_a_clear_error_with_the_password_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_rabbitmq_server()
    monkeypatch.chdir(tmp_path)
    host = RABBITMQ_URL.split("@", 1)[1].split("?", 1)[0]
    with pytest.raises(BrokerUnavailableError) as caught:
        QueueManager.from_url(f"amqp://guest:not-the-password@{host}", connect_timeout=5)
    text = str(caught.value)
    assert "refused the credentials" in text and "not-the-password" not in text
    assert "guest:***@" in text
    with pytest.raises(BrokerUnavailableError, match="virtual host"):
        QueueManager.from_url(f"amqp://guest:guest@{host}no-such-vhost", connect_timeout=5)


# -- lifecycle ------------------------------------------------------------------------------


def test_clear_deletes_the_broker_queues_and_they_come_back_on_use(
    make_queue: MakeQueue, queue_name: str
) -> None:
    queue = make_queue()
    other = make_queue()
    assert queue.push_many([("a", 1, 1), ("b", 2, 2)]) == [True, True]
    held = queue.reserve(timeout=1)
    assert held is not None and held.task_id == "b"
    assert queue.clear() == 1
    assert queue.ack(held) is False
    with pytest.raises(Exception, match="NOT_FOUND"):
        ready_messages(f"conveyor.{queue_name}")
    # Both managers declare the queue again when they next need it.
    assert other.push("c", 3, 5) is True
    message = queue.reserve(timeout=2)
    assert message is not None and message.task_id == "c" and queue.ack(message)


def test_a_connection_closed_by_the_broker_is_reopened_and_a_late_ack_refused(
    make_queue: MakeQueue,
) -> None:
    holder = make_queue()
    other = make_queue()
    assert holder.push("task", {"n": 1}, priority=5)
    first = holder.reserve(timeout=1)
    assert first is not None
    close_rabbitmq_connection(holder)
    second = wait_until(lambda: other.reserve(timeout=0.2), 10, message="the redelivery")
    assert second.task_id == "task" and second.attempts == 2
    assert holder.ack(first, result="late") is False
    assert holder.extend(first) is False and holder.nack(first) is False
    record = other.get_task("task")
    assert record is not None and record.status == TaskStatus.PROCESSING
    events = [event.event for event in record.history]
    assert events[-1] == "redelivered"
    assert other.ack(second, result="on time") is True
    assert holder.push("after", 2) and holder.get_queue_length() == 1  # waits for the link
    assert holder.server.link.reconnects == 1  # type: ignore[attr-defined]
