"""Helpers shared by the API test modules; each module declares its own thin fixtures."""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from conftest import IN_CI
from conveyor import QueueManager
from conveyor.settings import Settings

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

MakeClient = Callable[..., "TestClient"]


def require_modules(*names: str) -> None:
    """Skip the calling test module when a test dependency is missing; fail under CI=true
    (CI installs the 'api' extra and the test tools, so a skip there would hide a gap)."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if not missing:
        return
    reason = f"{', '.join(missing)} not installed (pip install -e '.[api,dev]')"
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: not skipping)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def clear_conveyor_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Conveyor variables (say, a token in the developer's shell) reach the settings."""
    for name in list(os.environ):
        if name.upper().startswith("CONVEYOR_") or name.upper() in ("REDIS_URL", "RABBITMQ_URL"):
            monkeypatch.delenv(name)


def client_factory(backend_url: str, queue_name: str) -> Iterator[MakeClient]:
    """Yields ``make(url=..., **settings)``: a started TestClient on an app for the backend
    and queue (settings sections as dicts); every client is shut down afterwards."""
    from fastapi.testclient import TestClient

    from conveyor.api import create_app

    clients: list[TestClient] = []

    def make(url: str = backend_url, **overrides: Any) -> TestClient:
        queue = {"name": queue_name, **overrides.pop("queue", {})}
        settings = Settings(url=url, queue=queue, **overrides)
        # localhost: a name api.allowed_hosts allows by default (TestClient's own is
        # "testserver", which an API without a token refuses, as it should).
        client = TestClient(
            create_app(settings), base_url="http://localhost", raise_server_exceptions=False
        )
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fail_task(queue: QueueManager, task_id: str, message: str = "disk full") -> None:
    """Dead-letter a task the way a worker does after its last try (push, reserve, fail)."""
    assert queue.push(task_id, {"n": 1}, 10)  # the most urgent: the next one reserved
    leased = queue.reserve(timeout=2)
    assert leased is not None and leased.task_id == task_id
    assert queue.fail(leased, reason="error", error=RuntimeError(message))


def no_traceback(response: Any) -> None:
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
