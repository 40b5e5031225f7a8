"""The API's monitoring side over real backends: stats, workers, /metrics, /health; a down
backend (503), bearer-token auth, the last-resort error handler and ``conveyor api``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from api_support import require_modules

require_modules("fastapi", "uvicorn", "prometheus_client", "httpx")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from api_support import (  # noqa: E402
    MakeClient,
    clear_conveyor_env,
    client_factory,
    fail_task,
    free_port,
    no_traceback,
)
from conftest import wait_until  # noqa: E402
from conveyor import ConfigError, QueueManager  # noqa: E402
from conveyor.api.serve import exposure_warning, is_loopback  # noqa: E402
from conveyor.settings import Settings, load_settings  # noqa: E402
from helpers.private_redis import PrivateRedis  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_conveyor_env(monkeypatch)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def make_client(backend_url: str, queue_name: str) -> Iterator[MakeClient]:
    yield from client_factory(backend_url, queue_name)


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


@pytest.fixture
def make_local_client(tmp_path: Path) -> Iterator[MakeClient]:
    """For what does not depend on the backend: SQLite only, not one run per backend."""
    yield from client_factory(f"sqlite:///{tmp_path}/api.db", "default")


CONVEYOR = Path(sys.executable).parent / "conveyor"
TOKEN = "s3cr3t-api-token-for-tests"


@pytest.fixture
def worker_id(queue: QueueManager) -> Iterator[str]:
    """A fake worker's id; its heartbeat is removed at teardown (the registry is shared)."""
    name = f"w-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(Exception):
        queue.unregister_worker(name)


def heartbeat(queue: QueueManager, worker_id: str, current: list[dict[str, Any]]) -> None:
    info = {"id": worker_id, "host": "test-host", "pid": 4242, "queues": [queue.queue_name],
            "concurrency": 2, "processed": 7, "failed": 1, "started_at": time.time() - 60,
            "last_seen": time.time(), "state": "running", "current": current}  # fmt: skip
    queue.register_worker(worker_id, info, ttl=30)


def samples(text: str, name: str, **labels: str) -> list[float]:
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def test_stats_count_each_status_and_sum_them(client: TestClient, queue: QueueManager) -> None:
    for n in range(3):
        assert queue.push(f"p{n}", {}, 5)
    fail_task(queue, "broken")
    body = client.get("/api/v1/stats").json()
    ours = [each for each in body["queues"] if each["queue"] == queue.queue_name]
    assert len(ours) == 1
    assert ours[0]["counts"]["pending"] == 3 and ours[0]["counts"]["failed"] == 1
    assert ours[0]["failed_last_minute"] == 1
    assert body["totals"]["counts"]["pending"] >= 3
    one = client.get(f"/api/v1/stats?queue={queue.queue_name}").json()
    assert [each["queue"] for each in one["queues"]] == [queue.queue_name]


def test_workers_show_their_current_task(
    client: TestClient, queue: QueueManager, worker_id: str
) -> None:
    assert queue.push("running-1", {}, 5)
    heartbeat(queue, worker_id, [{"task_id": "running-1", "queue": queue.queue_name,
                                  "type": "documents", "step": "transcribe"}])  # fmt: skip
    workers = client.get("/api/v1/workers").json()["workers"]
    mine = [w for w in workers if w["id"] == worker_id]
    assert len(mine) == 1
    assert mine[0]["current"][0]["task_id"] == "running-1"
    assert (mine[0]["host"], mine[0]["processed"]) == ("test-host", 7)
    others = client.get("/api/v1/workers?queue=some-other-queue").json()["workers"]
    assert worker_id not in [w["id"] for w in others]


def test_metrics_read_the_backend_at_scrape_time(
    client: TestClient, queue: QueueManager, worker_id: str
) -> None:
    for n in range(2):
        assert queue.push(f"p{n}", {}, 5)
    fail_task(queue, "broken")
    assert queue.push("busy", {}, 9)
    assert queue.reserve(timeout=2) is not None
    heartbeat(queue, worker_id, [{"task_id": "busy", "queue": queue.queue_name}])
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text, name = response.text, queue.queue_name
    assert samples(text, "conveyor_backend_up") == [1.0]
    assert samples(text, "conveyor_queue_depth", queue=name) == [2.0]
    assert samples(text, "conveyor_tasks_in_flight", queue=name) == [1.0]
    assert samples(text, "conveyor_tasks", queue=name, status="failed") == [1.0]
    assert samples(text, "conveyor_tasks_finished_total", queue=name, outcome="failed") == [1.0]
    assert samples(text, "conveyor_tasks_failed_last_minute", queue=name) == [1.0]
    assert samples(text, "conveyor_task_run_seconds_last_minute_count", queue=name) == [0.0]
    assert samples(text, "conveyor_workers")[0] >= 1
    # Read at scrape time: a second scrape sees the queue change.
    assert queue.push("p9", {}, 5)
    assert samples(client.get("/metrics").text, "conveyor_queue_depth", queue=name) == [3.0]


def test_metrics_and_stats_without_an_event_log_leave_the_counters_out(
    make_local_client: MakeClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A backend that keeps no event log (the base class's ``events``) answers /metrics
    with its gauges and without the counters, never a 500."""
    from conveyor.backends.base import Server
    from conveyor.backends.sqlite import SqliteServer

    monkeypatch.setattr(SqliteServer, "events", Server.events)
    client = make_local_client()
    queue = QueueManager.from_url(f"sqlite:///{tmp_path}/api.db", queue_name="default")
    try:
        assert queue.push("p1", {}, 5)
    finally:
        queue.close()
    response = client.get("/metrics")
    assert response.status_code == 200
    assert samples(response.text, "conveyor_queue_depth", queue="default") == [1.0]
    assert samples(response.text, "conveyor_tasks_finished_total", queue="default") == []
    assert client.get("/api/v1/stats").status_code == 200


def test_health_is_200_when_the_backend_answers(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


# -- a backend that is down -----------------------------------------------------------------


@pytest.fixture
def down_client(make_local_client: MakeClient) -> TestClient:
    """An app whose Redis URL points at a port nobody listens on (password in the URL)."""
    return make_local_client(url=f"redis://:hunter2@127.0.0.1:{free_port()}/0")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/health", None), ("POST", "/api/v1/tasks", {"data": 1}),
     ("GET", "/api/v1/tasks/x", None), ("GET", "/api/v1/tasks", None),
     ("DELETE", "/api/v1/tasks/x", None), ("POST", "/api/v1/tasks/x/retry", None),
     ("GET", "/api/v1/stats", None), ("GET", "/api/v1/workers", None)],
)  # fmt: skip
def test_a_down_backend_is_503_with_a_clear_message(
    down_client: TestClient, method: str, path: str, body: Any
) -> None:
    response = down_client.request(method, path, json=body)
    assert response.status_code == 503, response.text
    detail = response.json()["detail"]
    assert "Redis" in detail and "hunter2" not in response.text
    no_traceback(response)


def test_metrics_report_a_down_backend_as_up_0(down_client: TestClient) -> None:
    response = down_client.get("/metrics")
    assert response.status_code == 200
    assert samples(response.text, "conveyor_backend_up") == [0.0]


def test_the_api_recovers_when_the_backend_returns(
    make_local_client: MakeClient, tmp_path: Path
) -> None:
    # SQLite "down": a file stands where its directory should be; removing it brings the
    # backend back, and the API opens the queue on the next request.
    blocker = tmp_path / "later"
    blocker.write_text("not a directory")
    client = make_local_client(url=f"sqlite:///{blocker}/q.db")
    assert client.get("/health").status_code == 503
    assert client.post("/api/v1/tasks", json={}).status_code == 503
    blocker.unlink()
    assert client.get("/health").status_code == 200
    assert client.post("/api/v1/tasks", json={}).status_code == 201


def test_the_api_rides_out_a_redis_that_is_killed_and_restarted(
    make_local_client: MakeClient, private_redis: Callable[..., PrivateRedis]
) -> None:
    # The queue is opened (and cached) before the outage: the same manager, with its
    # connection pool, must serve again once Redis is back, without restarting the API.
    server = private_redis(aof=True)
    client = make_local_client(url=server.url)
    assert client.post("/api/v1/tasks", json={"id": "before"}).status_code == 201
    assert client.get("/health").status_code == 200
    server.kill()
    started = time.monotonic()
    health = client.get("/health")
    pushed = client.post("/api/v1/tasks", json={"id": "during"})
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert pushed.status_code == 503 and pushed.headers["retry-after"] == "5"
    assert "Redis" in pushed.json()["detail"]
    assert time.monotonic() - started < 5  # refused connections answer at once, no hang
    server.start()
    assert client.get("/health").status_code == 200
    assert client.post("/api/v1/tasks", json={"id": "after"}).status_code == 201
    assert client.get("/api/v1/tasks/after").json()["status"] == "pending"


# -- errors ---------------------------------------------------------------------------------


def test_an_unexpected_error_is_a_500_without_internals(
    make_local_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_local_client()

    def explode(self: QueueManager) -> None:
        raise RuntimeError("internal detail: password=swordfish")

    monkeypatch.setattr(QueueManager, "stats", explode)
    response = client.get("/api/v1/stats")
    assert response.status_code == 500
    assert "incident" in response.json()["detail"]
    assert "swordfish" not in response.text
    no_traceback(response)


# -- auth -----------------------------------------------------------------------------------


@pytest.fixture
def auth_client(make_local_client: MakeClient) -> TestClient:
    return make_local_client(api={"token": TOKEN})


PROTECTED = ["/api/v1/tasks", "/api/v1/tasks/x", "/api/v1/stats", "/api/v1/workers", "/metrics",
             "/api/v1/openapi.json"]  # fmt: skip


@pytest.mark.parametrize("path", PROTECTED)
def test_without_the_token_every_endpoint_but_health_is_401(
    auth_client: TestClient, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = auth_client.get(path, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert response.headers["www-authenticate"] == "Bearer"
    good = auth_client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert good.status_code in (200, 404), good.text  # /tasks/x: authorized, just unknown


def test_with_the_token_a_push_works_and_health_stays_open(auth_client: TestClient) -> None:
    assert auth_client.post("/api/v1/tasks", json={}).status_code == 401
    pushed = auth_client.post(
        "/api/v1/tasks", json={}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert pushed.status_code == 201
    assert auth_client.get("/health").status_code == 200
    assert auth_client.get("/").status_code == 200  # the page itself holds no data


def test_the_token_comes_from_conveyor_api_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_API_TOKEN", "from-env")
    settings = load_settings()
    assert settings.api.token is not None and settings.api.token.get_secret_value() == "from-env"
    assert "from-env" not in repr(settings)
    monkeypatch.setenv("CONVEYOR_API__TOKEN", "nested-wins")
    token = load_settings().api.token
    assert token is not None and token.get_secret_value() == "nested-wins"


def test_a_bad_api_setting_names_the_key_and_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONVEYOR_API__PORT", "70000")
    with pytest.raises(ConfigError, match=r"api\.port: .*CONVEYOR_API__PORT"):
        load_settings()


def test_binding_beyond_loopback_without_a_token_warns() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("api.example.com")
    assert exposure_warning(Settings()) is None
    warning = exposure_warning(Settings(api={"host": "0.0.0.0"}))
    assert warning is not None and "CONVEYOR_API_TOKEN" in warning
    assert exposure_warning(Settings(api={"host": "0.0.0.0", "token": TOKEN})) is None


# -- conveyor api ---------------------------------------------------------------------------


def test_conveyor_api_serves_the_dashboard_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    url = f"sqlite:///{tmp_path}/api.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    # The API logs to its own file, never to the worker's logging.file.
    config = tmp_path / "conveyor.yaml"
    config.write_text("logging:\n  file: logs/worker.log\napi:\n  log_file: logs/api.log\n")
    proc = subprocess.Popen([str(CONVEYOR), "api", "--url", url, "--port", str(port),
                             "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_until(lambda: _get(f"{base}/health"), timeout=20, message="the API")
        assert json.loads(health)["status"] == "ok"
        assert "<title>Conveyor</title>" in (_get(f"{base}/") or "")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read() if proc.stdout else ""
    assert f"http://127.0.0.1:{port}/" in output
    assert "Traceback" not in output
    assert f"http://127.0.0.1:{port}/" in (tmp_path / "logs" / "api.log").read_text()
    assert not (tmp_path / "logs" / "worker.log").exists()


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return None


def test_conveyor_api_without_the_extra_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None\n"  # as if FastAPI were not installed
        "from conveyor.cli import main; sys.exit(main(['api']))"
    )
    command = [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "pip install 'conveyor[api]'" in done.stderr and "Traceback" not in done.stderr
