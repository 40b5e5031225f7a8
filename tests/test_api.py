"""The HTTP API over real backends (SQLite, Redis; RabbitMQ where it runs) with TestClient.

Each test pushes through the API and checks the backend through a ``QueueManager`` on the
same queue (or the other way round), so the API is proved against the real queue, not
against itself. Errors must be JSON with a ``detail`` and never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api_support import require_modules

require_modules("fastapi", "uvicorn", "prometheus_client", "httpx")

from fastapi.testclient import TestClient  # noqa: E402

from api_support import (  # noqa: E402
    MakeClient,
    clear_conveyor_env,
    client_factory,
    fail_task,
    no_traceback,
)
from conveyor import QueueManager  # noqa: E402
from conveyor.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) leaves the root out
    sys.path.insert(0, str(ROOT))

JSON_HEADERS = {"content-type": "application/json"}


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


# -- pushing and reading ------------------------------------------------------------------------


def test_push_returns_the_id_at_once_and_the_record_is_readable(
    client: TestClient, queue: QueueManager
) -> None:
    body = {"type": "documents", "data": {"path": "a.txt"}, "priority": 8, "max_retries": 2}
    response = client.post("/api/v1/tasks", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "pending" and created["queue"] == queue.queue_name
    assert response.headers["location"].startswith(f"/api/v1/tasks/{created['id']}")
    record = queue.require_task(created["id"])
    assert (record.type, record.data, record.priority) == ("documents", {"path": "a.txt"}, 8)
    assert record.max_retries == 2

    got = client.get(f"/api/v1/tasks/{created['id']}").json()
    assert got["status"] == "pending" and got["data"] == {"path": "a.txt"}
    assert got["history"], "the record carries its history"


def test_seed_style_body_and_ids_with_slashes(client: TestClient, queue: QueueManager) -> None:
    # XQueue's field names (payload, max_retry) work; a delayed task starts scheduled.
    body = {"id": "meetings/2024/weekly", "type": "example", "payload": {"m": "hi"},
            "priority": 1, "max_retry": 3, "queue_timeout": 300, "process_timeout": 60,
            "delay": 30}  # fmt: skip
    response = client.post("/api/v1/tasks", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "scheduled"
    record = queue.require_task("meetings/2024/weekly")
    assert (record.data, record.max_retries, record.queue_timeout) == ({"m": "hi"}, 3, 300)
    got = client.get("/api/v1/tasks/meetings/2024/weekly")
    assert got.status_code == 200 and got.json()["status"] == "scheduled"


def test_pushed_tasks_run_in_priority_order(client: TestClient, queue: QueueManager) -> None:
    for task_id, priority in (("low", 1), ("high", 9), ("mid", 5)):
        assert client.post("/api/v1/tasks", json={"id": task_id, "priority": priority}).is_success
    taken = [queue.reserve(timeout=2) for _ in range(3)]
    assert [m.task_id for m in taken if m] == ["high", "mid", "low"]


def test_list_filters_by_status_and_pages(client: TestClient, queue: QueueManager) -> None:
    for n in range(5):
        assert queue.push(f"p{n}", {}, n)
    fail_task(queue, "broken")
    page = client.get("/api/v1/tasks", params={"status": "pending", "limit": 2, "offset": 1})
    assert page.status_code == 200
    assert [t["id"] for t in page.json()["tasks"]] == ["p3", "p2"]  # run order
    failed = client.get("/api/v1/tasks?status=failed").json()["tasks"]
    assert [t["id"] for t in failed] == ["broken"]
    assert failed[0]["error"]["message"] == "disk full"
    assert len(client.get("/api/v1/tasks").json()["tasks"]) == 6


def test_a_live_duplicate_is_409_and_a_finished_id_starts_over(
    client: TestClient, queue: QueueManager
) -> None:
    assert client.post("/api/v1/tasks", json={"id": "dup"}).status_code == 201
    again = client.post("/api/v1/tasks", json={"id": "dup"})
    assert again.status_code == 409
    assert "already" in again.json()["detail"] and "dup" in again.json()["detail"]
    leased = queue.reserve(timeout=2)
    assert leased is not None and queue.ack(leased)
    assert client.post("/api/v1/tasks", json={"id": "dup"}).status_code == 201


# -- cancel and retry -----------------------------------------------------------------------


def test_cancel_a_pending_task_then_retry_it(client: TestClient, queue: QueueManager) -> None:
    assert queue.push("c1", {}, 5)
    canceled = client.delete("/api/v1/tasks/c1")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert queue.require_task("c1").status == "canceled"
    twice = client.delete("/api/v1/tasks/c1")
    assert twice.status_code == 409 and "canceled" in twice.json()["detail"]

    retried = client.post("/api/v1/tasks/c1/retry")
    assert retried.status_code == 200 and retried.json()["status"] == "pending"
    not_finished = client.post("/api/v1/tasks/c1/retry")
    assert not_finished.status_code == 409 and "pending" in not_finished.json()["detail"]


def test_retry_a_failed_task_requeues_it(client: TestClient, queue: QueueManager) -> None:
    fail_task(queue, "f1")
    response = client.post("/api/v1/tasks/f1/retry")
    assert response.status_code == 200
    assert response.json()["status"] == "pending" and response.json()["attempts"] == 0
    leased = queue.reserve(timeout=2)
    assert leased is not None and leased.task_id == "f1"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/v1/tasks/nope"), ("DELETE", "/api/v1/tasks/nope"),
     ("POST", "/api/v1/tasks/nope/retry"), ("GET", "/api/v1/tasks/nope?queue=ghost"),
     ("GET", "/api/v1/tasks/nope%01")],
)  # fmt: skip
def test_unknown_ids_are_404(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]


def test_reads_on_an_unknown_queue_do_not_create_it(
    client: TestClient, queue: QueueManager
) -> None:
    assert client.get("/api/v1/tasks?queue=ghost-queue").json()["tasks"] == []
    assert client.get("/api/v1/tasks/x?queue=ghost-queue").status_code == 404
    assert client.get("/api/v1/stats?queue=ghost-queue").status_code == 404
    assert "ghost-queue" not in queue.known_queues()


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [({"priority": 11}, "priority"), ({"priority": -1}, "priority"),
     ({"priority": "5"}, "priority"), ({"priority": True}, "priority"),
     ({"priority": 2.5}, "priority"), ({"delay": -1}, "delay"), ({"delay": "soon"}, "delay"),
     ({"queue_timeout": 0}, "queue_timeout"), ({"process_timeout": -3}, "process_timeout"),
     ({"max_retries": -1}, "max_retries"), ({"type": ""}, "type"), ({"id": ""}, "id"),
     ({"id": "x" * 201}, "id"), ({"id": "bad\x01id"}, "id"), ({"queue": "{tag}"}, "queue"),
     ({"queue": "two words"}, "queue"), ({"colour": "red"}, "colour"),
     ({"data": "x" * 5000}, "data")],
)  # fmt: skip
def test_bad_push_is_422_naming_the_field(
    make_client: MakeClient, queue: QueueManager, body: dict[str, Any], field: str
) -> None:
    client = make_client(queue={"max_payload_bytes": 4096})
    response = client.post("/api/v1/tasks", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(field in error["loc"] for error in detail), detail
    no_traceback(response)
    assert queue.list_tasks() == [], "a rejected push writes nothing"


@pytest.mark.parametrize(
    "request_",
    [("POST", "/api/v1/tasks", {"content": b"{not json", "headers": JSON_HEADERS}),
     ("POST", "/api/v1/tasks", {"json": [1, 2]}),
     ("GET", "/api/v1/tasks?limit=0", {}), ("GET", "/api/v1/tasks?limit=many", {}),
     ("GET", "/api/v1/tasks?offset=-1", {}), ("GET", "/api/v1/tasks?status=lost", {}),
     ("GET", "/api/v1/tasks?stauts=failed", {})],
)  # fmt: skip
def test_bad_requests_are_422(client: TestClient, request_: tuple[str, str, Any]) -> None:
    method, path, extra = request_
    response = client.request(method, path, **extra)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]
    no_traceback(response)


def test_an_oversized_body_is_413_before_it_is_read(make_client: MakeClient) -> None:
    client = make_client(queue={"max_payload_bytes": 1024})
    response = client.post("/api/v1/tasks", content=b"[" + b"1," * 200_000 + b"1]",
                           headers=JSON_HEADERS)  # fmt: skip
    assert response.status_code == 413 and "limit" in response.json()["detail"]


# -- the producer example ---------------------------------------------------------------------


def test_the_producer_example_pushes_and_returns_the_id_at_once(
    backend_url: str, queue_name: str, queue: QueueManager
) -> None:
    from examples.producer_app import create_producer

    settings = Settings(url=backend_url, queue={"name": queue_name})
    with TestClient(create_producer(settings)) as producer:
        accepted = producer.post("/documents", json={"path": "examples/docs/tides.txt"})
        assert accepted.status_code == 202
        task_id = accepted.json()["task_id"]
        record = queue.require_task(task_id)
        assert (record.status, record.type, record.data) == (
            "pending", "documents", {"path": "examples/docs/tides.txt"},
        )  # fmt: skip
        leased = queue.reserve(timeout=2)
        assert leased is not None and queue.ack(leased, {"words": 42})
        done = producer.get(f"/documents/{task_id}").json()
        assert (done["status"], done["result"]) == ("success", {"words": 42})
        assert producer.get("/documents/nope").status_code == 404
        assert producer.post("/documents", json={"path": ""}).status_code == 422
