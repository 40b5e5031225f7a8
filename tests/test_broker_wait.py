"""A starting worker waits for its broker, and stops at once on what waiting cannot fix.

Real ``conveyor worker`` processes against private servers: a Redis that does not exist
yet, a RabbitMQ node whose app is stopped, a Redis that wants a password, a connection
that hangs in a black hole. Waiting is ``worker.broker_wait`` (forever by default, or
``--wait SECONDS``); a bad URL or refused credentials exit 2 at once; SIGTERM during the
wait exits 0 promptly.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import wait_until
from conveyor import BrokerAuthenticationError, BrokerUnavailableError, QueueManager
from conveyor.settings import load_settings
from conveyor.worker.backoff import Backoff
from helpers.private_rabbitmq import PrivateRabbitMQ
from helpers.private_redis import PrivateRedis, free_port
from helpers.tcp_proxy import TcpProxy
from helpers.worker_process import WorkerProcess

RedisFactory = Callable[..., PrivateRedis]
Workers = Callable[..., WorkerProcess]
WAITING = "waiting for the backend"
ANSWERED = "answered after"


def drain(queue: QueueManager, count: int, timeout: float = 30.0) -> None:
    """Push ``count`` short tasks and wait until every one succeeded."""
    queue.push_many([(f"t{i}", {"sleep": 0.05}, 5) for i in range(count)])
    wait_until(
        lambda: queue.stats().counts["success"] == count,
        timeout=timeout,
        message=lambda: f"{count} successes; counts {queue.stats().counts}",
    )


def test_a_worker_started_before_its_redis_works_once_redis_starts(
    private_redis: RedisFactory, worker_process: Workers
) -> None:
    server = private_redis(aof=True, start=False)
    worker = worker_process(server.url, "-Q", "first")
    worker.wait_for(WAITING)
    assert worker.proc.poll() is None
    server.start()
    up = time.monotonic()
    resumed = worker.wait_for(ANSWERED) - up
    print(f"worker connected {resumed:.2f}s after Redis answered")
    assert resumed < 5  # backoff capped at 1 s (plus this machine's scheduling)
    queue = QueueManager.from_url(server.url, queue_name="first")
    try:
        drain(queue, 5)
    finally:
        queue.close()
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    log = worker.log()
    assert log.count(WAITING) == 1 and log.count(ANSWERED) == 1  # one line each, no spam


def test_a_worker_started_while_rabbitmq_is_stopped_works_once_it_starts(
    rabbitmq_node: PrivateRabbitMQ, worker_process: Workers, tmp_path: Path
) -> None:
    url = rabbitmq_node.amqp_url(f"task_store=sqlite:///{tmp_path}/store.db")
    rabbitmq_node.stop_app()
    try:
        worker = worker_process(url, "-Q", "rfirst")
        worker.wait_for(WAITING)
    finally:
        rabbitmq_node.start_app()
    worker.wait_for(ANSWERED)
    queue = QueueManager.from_url(url, queue_name="rfirst", connect_timeout=2)
    try:
        drain(queue, 3)
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0
    finally:
        queue.clear()
        queue.close()


@pytest.mark.parametrize("password", ["wrong-password", None], ids=["wrong", "none"])
def test_refused_redis_credentials_exit_2_at_once(
    private_redis: RedisFactory, worker_process: Workers, password: str | None
) -> None:
    server = private_redis(password="right-password")
    auth = f":{password}@" if password else ""
    worker = worker_process(f"redis://{auth}127.0.0.1:{server.port}/0")
    assert worker.wait(timeout=30) == 2
    elapsed = time.monotonic() - worker.started
    log = worker.log()
    assert "refused the credentials" in log and "check the password" in log
    assert WAITING not in log
    assert "wrong-password" not in log and "right-password" not in log  # masked
    print(f"exit 2 after {elapsed:.1f}s (interpreter start included)")


def test_refused_credentials_raise_the_authentication_error(
    private_redis: RedisFactory, rabbitmq_node: PrivateRabbitMQ, tmp_path: Path
) -> None:
    server = private_redis(password="right-password")
    with pytest.raises(BrokerAuthenticationError) as caught:
        QueueManager.from_url(server.url.replace("right-password", "nope"))
    assert isinstance(caught.value, BrokerUnavailableError)  # callers that catch the parent
    store = f"task_store=sqlite:///{tmp_path}/store.db"
    bad = rabbitmq_node.amqp_url(store).replace("guest:guest@", "guest:nope@")
    with pytest.raises(BrokerAuthenticationError, match="refused the credentials"):
        QueueManager.from_url(bad, connect_timeout=2)


def test_a_worker_with_a_refused_rabbitmq_password_exits_2(
    rabbitmq_node: PrivateRabbitMQ, worker_process: Workers, tmp_path: Path
) -> None:
    store = f"task_store=sqlite:///{tmp_path}/store.db"
    bad = rabbitmq_node.amqp_url(store).replace("guest:guest@", "guest:nope@")
    worker = worker_process(bad)
    assert worker.wait(timeout=30) == 2
    assert "refused the credentials" in worker.log() and WAITING not in worker.log()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1:notaport/0", "Port could not be cast"),
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        ("amqp://guest:guest@127.0.0.1:5672/?heartbeat=soon", "heartbeat"),
        ("redis+tls://127.0.0.1:6379/0", "cannot tell the backend"),
    ],
    ids=["port-not-a-number", "port-out-of-range", "bad-amqp-option", "unknown-scheme"],
)
def test_a_bad_url_exits_2_at_once(worker_process: Workers, url: str, says: str) -> None:
    worker = worker_process(url)
    assert worker.wait(timeout=30) == 2
    assert says in worker.log() and WAITING not in worker.log()


def test_sigterm_while_waiting_exits_0_promptly(worker_process: Workers) -> None:
    worker = worker_process(f"redis://127.0.0.1:{free_port()}/0")
    worker.wait_for(WAITING)
    sent = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0
    print(f"exited {time.monotonic() - sent:.2f}s after SIGTERM")
    assert "SIGTERM while waiting for the backend: stopped" in worker.log()


def test_sigint_during_a_connect_that_hangs_exits_0_promptly(
    private_redis: RedisFactory, tcp_proxy: Callable[[int], TcpProxy], worker_process: Workers
) -> None:
    """A black-holed connection would block the attempt for the socket timeout (10 s with
    connect_timeout 5): the signal must not wait for it."""
    server = private_redis()
    proxy = tcp_proxy(server.port)
    proxy.blackhole()
    worker = worker_process(
        f"redis://127.0.0.1:{proxy.port}/0", env={"CONVEYOR_QUEUE__CONNECT_TIMEOUT": "5"}
    )
    wait_until(lambda: proxy.accepted >= 1, timeout=30, message="the worker's connect")
    sent = time.monotonic()
    worker.signal(signal.SIGINT)
    assert worker.wait(timeout=10) == 0
    elapsed = time.monotonic() - sent
    print(f"exited {elapsed:.2f}s after SIGINT, mid-connect")
    assert elapsed < 5
    assert "SIGINT while waiting for the backend: stopped" in worker.log()


def test_a_finite_wait_gives_up_with_exit_2(worker_process: Workers) -> None:
    worker = worker_process(f"redis://127.0.0.1:{free_port()}/0", "--wait", "1")
    assert worker.wait(timeout=30) == 2
    log = worker.log()
    assert WAITING in log and "up to 1s" in log
    assert "gave up after waiting" in log and "worker.broker_wait is 1s" in log


def test_wait_0_fails_at_once_as_before(worker_process: Workers) -> None:
    worker = worker_process(f"redis://127.0.0.1:{free_port()}/0", "--wait", "0")
    assert worker.wait(timeout=30) == 2
    assert "cannot reach Redis" in worker.log() and WAITING not in worker.log()


# -- the pieces -------------------------------------------------------------------------------


def test_backoff_doubles_from_first_to_the_cap_with_jitter() -> None:
    backoff = Backoff(0.1, 1.0)
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    backoff.reset()
    assert 0.05 <= backoff.next_delay() <= 0.1
    with pytest.raises(ValueError, match="first <= cap"):
        Backoff(2.0, 1.0)


@pytest.mark.parametrize(
    ("value", "expected"), [("forever", None), ("30", 30.0), ("0", 0.0), ("FOREVER", None)]
)
def test_broker_wait_setting(
    value: str, expected: float | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVEYOR_WORKER__BROKER_WAIT", value)
    assert load_settings().worker.broker_wait_seconds() == expected


def test_broker_wait_rejects_other_words(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVEYOR_WORKER__BROKER_WAIT", "never")
    with pytest.raises(ValueError, match=r"number of seconds .* or 'forever'"):
        load_settings()
    monkeypatch.delenv("CONVEYOR_WORKER__BROKER_WAIT")
    monkeypatch.setenv("CONVEYOR_WORKER__RECONNECT_BACKOFF", "5")
    with pytest.raises(ValueError, match="reconnect_max_backoff"):
        load_settings()
