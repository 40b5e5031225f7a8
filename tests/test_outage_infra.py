"""The tools outage tests stand on, each shown to do what it says.

A private RabbitMQ node that pushes and reserves and comes back after ``stop_app`` /
``start_app``; a TCP proxy that passes, drops, black-holes, rejects and restores; a
private Redis with AOF that keeps its data through SIGKILL and a restart on the same port,
and that stops answering while SIGSTOPped.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import wait_until
from conveyor import BrokerUnavailableError, QueueManager
from helpers.private_rabbitmq import PrivateRabbitMQ
from helpers.private_redis import PrivateRedis
from helpers.tcp_proxy import TcpProxy

RedisFactory = Callable[..., PrivateRedis]


def one_shot_client(port: int) -> redis.Redis:
    """A client that reports each failure at once (redis-py retries thrice by default)."""
    return redis.Redis(
        port=port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


# -- the private RabbitMQ node -----------------------------------------------------------------


@pytest.fixture
def rabbit_queue(rabbitmq_node: PrivateRabbitMQ, tmp_path: Path) -> Iterator[QueueManager]:
    url = rabbitmq_node.amqp_url(f"task_store=sqlite:///{tmp_path}/s.db")
    manager = QueueManager.from_url(url, queue_name="infra", connect_timeout=2)
    yield manager
    manager.close()


def test_the_private_rabbitmq_node_pushes_reserves_and_comes_back_after_a_restart(
    rabbitmq_node: PrivateRabbitMQ, rabbit_queue: QueueManager, tmp_path: Path
) -> None:
    print(f"private RabbitMQ node {rabbitmq_node.node} on port {rabbitmq_node.port}: "
          f"started in {rabbitmq_node.startup_seconds:.1f}s")  # fmt: skip
    assert rabbitmq_node.port != 5672
    assert rabbit_queue.push("a", {"n": 1}) is True
    message = rabbit_queue.reserve(timeout=5)
    assert message is not None and message.task_id == "a"
    assert rabbit_queue.ack(message, {"ok": True}) is True

    status = rabbitmq_node.ctl("status").stdout
    assert str(rabbitmq_node.port) in status and "15672" not in status  # no management port

    started = time.monotonic()
    rabbitmq_node.stop_app()
    assert not rabbitmq_node.accepting()
    url = rabbitmq_node.amqp_url(f"task_store=sqlite:///{tmp_path}/s.db")
    with pytest.raises(BrokerUnavailableError):
        QueueManager.from_url(url, queue_name="infra", connect_timeout=1)
    rabbitmq_node.start_app()
    print(f"stop_app + start_app took {time.monotonic() - started:.1f}s")
    again = QueueManager.from_url(url, queue_name="infra", connect_timeout=2)
    try:
        assert again.push("b", {"n": 2}) is True
        message = again.reserve(timeout=5)
        assert message is not None and message.task_id == "b"
        assert again.ack(message) is True
    finally:
        again.clear()
        again.close()


# -- the TCP proxy ----------------------------------------------------------------------------


def _ask(sock: socket.socket, timeout: float = 2.0) -> bytes:
    """Send PING and read the answer (b"" on a closed connection)."""
    sock.settimeout(timeout)
    sock.sendall(b"PING\r\n")
    return sock.recv(64)


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return _ask(sock) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_the_tcp_proxy_passes_drops_blackholes_rejects_and_restores(
    private_redis: RedisFactory, tcp_proxy: Callable[[int], TcpProxy]
) -> None:
    server = private_redis()
    proxy = tcp_proxy(server.port)
    first = socket.create_connection(("127.0.0.1", proxy.port))
    assert _ask(first) == b"+PONG\r\n"
    wait_until(lambda: proxy.open_connections == 1, timeout=5)

    assert proxy.drop() == 1
    assert _closed_by_peer(first)
    second = socket.create_connection(("127.0.0.1", proxy.port))
    assert _ask(second) == b"+PONG\r\n"  # after a drop, new connections pass

    proxy.blackhole()
    with pytest.raises(TimeoutError):
        _ask(second, timeout=0.3)  # open, but silent
    third = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)  # accepted, held
    with pytest.raises(TimeoutError):
        _ask(third, timeout=0.3)
    proxy.restore()
    second.settimeout(2)
    assert b"+PONG" in second.recv(64)  # the held request goes through: a healed partition
    third.settimeout(2)
    assert third.recv(64) == b"+PONG\r\n"

    proxy.reject()
    assert _closed_by_peer(second)
    fourth = socket.create_connection(("127.0.0.1", proxy.port))
    assert _closed_by_peer(fourth)
    proxy.restore()
    fifth = socket.create_connection(("127.0.0.1", proxy.port))
    assert _ask(fifth) == b"+PONG\r\n"
    assert proxy.accepted == 5
    for sock in (first, second, third, fourth, fifth):
        sock.close()


def test_a_redis_client_through_a_black_hole_times_out_and_recovers(
    private_redis: RedisFactory, tcp_proxy: Callable[[int], TcpProxy]
) -> None:
    server = private_redis()
    proxy = tcp_proxy(server.port)
    client = one_shot_client(proxy.port)
    try:
        assert client.ping()
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(redis.RedisError):
            client.ping()
        assert time.monotonic() - started < 3  # bounded by the client's timeout, no hang
        proxy.restore()
        assert wait_until(client.ping, timeout=5)
    finally:
        client.close()


# -- the private Redis ------------------------------------------------------------------------


def test_a_private_redis_with_aof_keeps_its_data_through_sigkill_and_restart(
    private_redis: RedisFactory,
) -> None:
    server = private_redis(aof=True)
    client = one_shot_client(server.port)
    try:
        client.set("kept", "yes")
        server.kill()
        with pytest.raises(redis.ConnectionError):
            client.get("kept")
        seconds = server.start()
        print(f"private Redis restarted on port {server.port} in {seconds * 1000:.0f} ms")
        assert client.get("kept") == b"yes"

        server.pause()
        with pytest.raises(redis.TimeoutError):
            client.get("kept")
        server.resume()
        assert wait_until(lambda: client.get("kept") == b"yes", timeout=5)
    finally:
        client.close()


def test_a_private_redis_can_start_after_its_port_is_known(private_redis: RedisFactory) -> None:
    server = private_redis(start=False, password="s3cret")
    assert not server.running and "s3cret@" in server.url
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()
    server.start()
    client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5)
    try:
        assert client.ping()
    finally:
        client.close()
