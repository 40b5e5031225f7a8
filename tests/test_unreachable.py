"""A broker that is not there raises a Conveyor error naming the URL without its password.

Never a silent False, never a hang past the connect timeout, never the secret in the
message or the traceback (it ends up in logs).
"""

from __future__ import annotations

import socket
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require_backend_module
from conveyor import BrokerUnavailableError, ConveyorError, QueueManager


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def open_and_push(url: str, **options: Any) -> None:
    """Construct a manager and use it: either step may be the one that raises."""
    queue = QueueManager.from_url(url, queue_name="unreachable", **options)
    try:
        assert queue.push("t", 1) is True, "push returned without the broker"
    finally:
        queue.close()


def full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@pytest.fixture
def redis_backend() -> None:
    require_backend_module("redis")


@pytest.fixture
def sqlite_backend() -> None:
    require_backend_module("sqlite")


@pytest.mark.parametrize(
    ("userinfo", "masked"),
    [
        pytest.param(":secret", ":***", id="password-only"),
        pytest.param("bob:secret", "bob:***", id="user"),
    ],
)
def test_redis_not_listening_raises_broker_unavailable_with_the_password_masked(
    redis_backend: None, userinfo: str, masked: str
) -> None:
    port = free_port()
    url = f"redis://{userinfo}@127.0.0.1:{port}/0"
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as caught:
        open_and_push(url, connect_timeout=1)
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"took {elapsed:.1f}s with connect_timeout=1"
    message = str(caught.value)
    assert f"redis://{masked}@127.0.0.1:{port}/0" in message
    assert "secret" not in message
    assert "secret" not in full_text(caught.value), "the password leaks through the traceback"
    assert isinstance(caught.value, ConnectionError)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections (the kernel does) but never answers a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


@pytest.fixture
def closing_server() -> Iterator[int]:
    """A port whose server hangs up on every connection at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_redis_that_hangs_up_raises_broker_unavailable(
    redis_backend: None, closing_server: int
) -> None:
    url = f"redis://:secret@127.0.0.1:{closing_server}/0"
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as caught:
        open_and_push(url, connect_timeout=1)
    assert time.monotonic() - started < 5
    assert "***" in str(caught.value) and "secret" not in full_text(caught.value)


@pytest.mark.slow
def test_redis_that_never_answers_raises_broker_unavailable_instead_of_hanging(
    redis_backend: None, silent_server: int
) -> None:
    url = f"redis://:secret@127.0.0.1:{silent_server}/0"
    outcome: dict[str, BaseException] = {}

    def attempt() -> None:
        try:
            open_and_push(url, connect_timeout=1)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(30)
    elapsed = time.monotonic() - started
    assert not thread.is_alive(), "still blocked after 30s on a server that never answers"
    assert isinstance(outcome.get("error"), BrokerUnavailableError), outcome
    assert "secret" not in full_text(outcome["error"])
    print(f"a silent Redis was reported after {elapsed:.1f}s with connect_timeout=1")


def test_sqlite_path_under_a_regular_file_raises_broker_unavailable_naming_the_path(
    sqlite_backend: None, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = blocker / "sub" / "q.db"
    with pytest.raises(BrokerUnavailableError) as caught:
        open_and_push(f"sqlite:///{path}")
    assert str(path) in str(caught.value)
    assert not (blocker / "sub").exists()


def test_sqlite_path_that_is_a_directory_raises_broker_unavailable_naming_it(
    sqlite_backend: None, tmp_path: Path
) -> None:
    with pytest.raises(BrokerUnavailableError) as caught:
        open_and_push(f"sqlite:///{tmp_path}")
    assert str(tmp_path) in str(caught.value)


def test_sqlite_file_that_is_not_a_database_raises_a_conveyor_error_naming_it(
    sqlite_backend: None, tmp_path: Path
) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database file, " * 100)
    with pytest.raises(ConveyorError) as caught:
        open_and_push(f"sqlite:///{path}")
    assert str(path) in str(caught.value)
    assert path.read_bytes() == b"this is not a database file, " * 100, "the file was changed"
