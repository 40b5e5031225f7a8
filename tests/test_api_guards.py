"""What a request must pass before the API spends anything on it, and odd input at its edge.

* Body limits hold on the stream, chunked uploads included, before auth and parsing: a real
  100 MB upload to a real server (``conveyor api`` in a subprocess) is answered 413 early
  and the server's memory does not grow with it.
* Without a token: the Host header must name an allowed host (DNS rebinding), and a state
  change from a browser must come from the server's own origin, exactly.
* Every answer carries the usual security headers; a 405 names the allowed methods.
* NaN, Infinity and integers past 2^63 in the body are 422s, never 500s.
* Odd task ids ("/..", "%", "?", a trailing "/retry") route to their own task, and the
  Location of a push names the task pushed; "." and ".." are refused.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from api_support import require_modules

require_modules("fastapi", "uvicorn", "httpx")

from fastapi.testclient import TestClient  # noqa: E402

from api_support import MakeClient, clear_conveyor_env, client_factory, free_port  # noqa: E402
from conftest import wait_until  # noqa: E402
from conveyor import QueueManager  # noqa: E402

CONVEYOR = Path(sys.executable).parent / "conveyor"
JSON = {"content-type": "application/json"}
TOKEN = "guard-test-token"
MB = 1024 * 1024


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_conveyor_env(monkeypatch)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[MakeClient]:
    """Clients on a SQLite file of the test's own (what is tested does not depend on the
    backend), at http://localhost."""
    yield from client_factory(f"sqlite:///{tmp_path}/api.db", "default")


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[QueueManager]:
    with QueueManager.from_url(f"sqlite:///{tmp_path}/api.db") as manager:
        yield manager


# -- body limits on a real server -------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def upload(port: int, total: int, *, chunked: bool) -> tuple[bytes, int]:
    """Send a POST of ``total`` bytes (chunked or with Content-Length) without waiting for
    the server between chunks; stop when it answers or drops the connection. Returns the
    answer's head and how many body bytes went out."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    sock.sendall(
        f"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\n{length}\r\n\r\n".encode()
    )
    block = b"[" * MB
    piece = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
    answer, sent = b"", 0
    deadline = time.monotonic() + 60
    try:
        while sent < total and b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            elif writable:
                sock.sendall(piece)
                sent += len(block)
        if sent >= total and chunked:
            sock.sendall(b"0\r\n\r\n")  # the last chunk: the server read it all
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: read what it said below, if anything
    finally:
        sock.close()
    return answer.split(b"\r\n\r\n", 1)[0], sent


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """``conveyor api`` with a token, on a free port: (port, pid)."""
    port = free_port()
    env = {**os.environ, "CONVEYOR_URL": f"sqlite:///{tmp_path}/q.db",
           "CONVEYOR_API__PORT": str(port), "CONVEYOR_API_TOKEN": TOKEN}  # fmt: skip
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen([str(CONVEYOR), "api"], env=env, cwd=tmp_path, stderr=log)

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return proc.poll() is not None  # exited: fail below, with its log

    wait_until(listening, timeout=30, message="conveyor api to listen")
    assert proc.poll() is None, (tmp_path / "api.log").read_text()
    yield port, proc.pid
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_a_100_mb_upload_is_refused_early_before_auth_and_memory_stays_low(
    api_server: tuple[int, int], chunked: bool
) -> None:
    port, pid = api_server
    before = rss_mb(pid)
    head, sent = upload(port, 100 * MB, chunked=chunked)
    growth = rss_mb(pid) - before
    assert head.startswith(b"HTTP/1.1 413"), head  # not 401: nothing is read before the limit
    assert sent < 50 * MB, f"the server read {sent / MB:.0f} MB before answering"
    assert growth < 25, f"the server grew by {growth:.0f} MB for a refused upload"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as health:
        assert health.status == 200  # and the server serves on


def test_chunked_bodies_over_the_limit_are_413_and_under_it_are_served(
    make_client: MakeClient, queue: QueueManager
) -> None:
    client = make_client(queue={"max_payload_bytes": 1024})  # body limit 4 KiB + 64 KiB

    def chunks(total: int) -> Iterator[bytes]:
        yield b'{"id": "c", "data": "'
        for _ in range(total // 1024):
            yield b"x" * 1024
        yield b'"}'

    big = client.post("/api/v1/tasks", content=chunks(200 * 1024), headers=JSON)
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    assert big.headers["connection"] == "close"
    small = client.post("/api/v1/tasks", content=chunks(0), headers=JSON)
    assert small.status_code == 201, small.text
    assert queue.require_task("c").data == ""


# -- no token: Host and Origin ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("localhost", True), ("localhost:8000", True), ("127.0.0.1:9999", True),
     ("[::1]:8000", True), ("LOCALHOST.", True), ("evil.example", False),
     ("evil.example:8000", False), ("127.0.0.1.evil.example", False), ("localhost:x", False),
     ("[::1", False), ("", False)],
)  # fmt: skip
def test_without_a_token_the_host_must_be_allowed(
    client: TestClient, host: str, allowed: bool
) -> None:
    answer = client.get("/api/v1/stats", headers={"host": host})
    assert (answer.status_code == 200) is allowed, answer.text
    if not allowed:
        assert answer.status_code == 400 and "allowed_hosts" in answer.json()["detail"]
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_allowed_hosts_and_the_bound_host_are_configurable(make_client: MakeClient) -> None:
    client = make_client(api={"allowed_hosts": ["queue.internal:8000"], "host": "10.1.2.3"})
    assert client.get("/health", headers={"host": "queue.internal:8000"}).status_code == 200
    assert client.get("/health", headers={"host": "queue.internal:9000"}).status_code == 400
    assert client.get("/health", headers={"host": "10.1.2.3:8000"}).status_code == 200
    assert client.get("/health", headers={"host": "localhost"}).status_code == 400
    wildcard = make_client(api={"host": "0.0.0.0"})
    assert wildcard.get("/health", headers={"host": "0.0.0.0:8000"}).status_code == 400


@pytest.mark.parametrize(
    ("headers", "refused"),
    [({}, False),
     ({"origin": "http://localhost"}, False),
     ({"origin": "http://localhost:80"}, False),
     ({"origin": "http://localhost:8001"}, True),
     ({"origin": "http://127.0.0.1"}, True),
     ({"origin": "https://localhost"}, True),
     ({"origin": "null"}, True),
     ({"origin": "http://evil.example"}, True),
     ({"sec-fetch-site": "same-origin"}, False),
     ({"sec-fetch-site": "same-site"}, True),
     ({"sec-fetch-site": "cross-site"}, True)],
)  # fmt: skip
def test_without_a_token_state_changes_must_come_from_the_same_origin(
    client: TestClient, queue: QueueManager, headers: dict[str, str], refused: bool
) -> None:
    assert queue.push("victim", {"n": 1})
    for method, path in (("DELETE", "/api/v1/tasks/victim"), ("POST", "/api/v1/tasks")):
        answer = client.request(method, path, headers=headers, json={"id": "new"})
        if refused:
            assert answer.status_code == 403, answer.text
            assert "origin" in answer.json()["detail"] or "browser" in answer.json()["detail"]
        else:
            assert answer.status_code in (200, 201), answer.text
    assert (queue.require_task("victim").status == "pending") is refused
    assert (queue.get_task("new") is None) is refused
    # Reads are not state changes: a page of another origin may send them (it cannot read
    # the answer without CORS, which this API does not grant).
    assert client.get("/api/v1/tasks/victim", headers=headers).status_code == 200


def test_with_a_token_host_and_origin_are_the_tokens_business(make_client: MakeClient) -> None:
    client = make_client(api={"token": TOKEN})
    auth = {"authorization": f"Bearer {TOKEN}"}
    foreign = {"host": "queue.example.com", "origin": "https://dashboard.example.com"}
    assert client.post("/api/v1/tasks", json={}, headers={**auth, **foreign}).status_code == 201
    assert client.post("/api/v1/tasks", json={}, headers=foreign).status_code == 401


# -- headers on every answer, and 405s -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/static/dashboard.js"), ("GET", "/api/v1/stats"), ("GET", "/health"),
     ("GET", "/metrics"), ("GET", "/api/v1/tasks/nope"), ("GET", "/nowhere"),
     ("PUT", "/api/v1/tasks"), ("POST", "/api/v1/tasks")],
)  # fmt: skip
def test_every_answer_carries_the_security_headers(
    client: TestClient, method: str, path: str
) -> None:
    answer = client.request(method, path, content=b"{", headers=JSON)
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["referrer-policy"] == "same-origin"
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    if path in ("/", "/static/dashboard.js"):  # the page keeps its own strict policy
        assert "script-src 'self'" in answer.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("PUT", "/api/v1/tasks", "GET, POST"), ("PATCH", "/api/v1/tasks/x", "GET, DELETE"),
     ("GET", "/api/v1/tasks/x/retry", "POST"), ("DELETE", "/api/v1/stats", "GET"),
     ("POST", "/api/v1/workers", "GET"), ("OPTIONS", "/api/v1/tasks", "GET, POST"),
     ("POST", "/health", "GET"), ("PUT", "/api/v1/tasks/a%2Fretry", "GET, DELETE")],
)  # fmt: skip
def test_a_405_names_the_allowed_methods(
    client: TestClient, method: str, path: str, allow: str
) -> None:
    answer = client.request(method, path)
    assert answer.status_code == 405
    assert answer.headers["allow"] == allow


# -- numbers the API cannot store ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [('{"data": 1, "retry_backoff": NaN}', "retry_backoff"),
     ('{"data": 1, "delay": Infinity}', "delay"),
     ('{"data": 1, "queue_timeout": -Infinity}', "queue_timeout"),
     ('{"data": 1, "process_timeout": 1e400}', "process_timeout"),
     ('{"data": 1, "priority": NaN}', "priority"),
     ('{"data": 1, "max_retries": 9223372036854775808}', "max_retries"),
     ('{"data": 1, "max_retries": 2147483648}', "max_retries"),
     ('{"data": 1, "priority": 9223372036854775808}', "priority"),
     ('{"data": 1, "retry_backoff": 1e300}', "retry_backoff"),
     ('{"data": NaN}', "data"), ('{"data": [1e400]}', "data"),
     ('{"data": 1, "id": "\\ud800"}', "id")],
)  # fmt: skip
def test_nan_infinity_and_overflowing_numbers_are_422(
    client: TestClient, body: str, field: str
) -> None:
    answer = client.post("/api/v1/tasks", content=body, headers=JSON)
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["detail"][0]["loc"]


# -- odd ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task_id",
    ["a/../b", "a/./b", "/..", "../b", "...", "50%", "100%2F", "what?x=1#frag", "x/retry",
     "meetings/2024/weekly", "sp ace", "é/ü"],
)  # fmt: skip
def test_odd_ids_route_to_their_own_task_and_location_names_it(
    client: TestClient, queue: QueueManager, task_id: str
) -> None:
    for decoy in ("b", "a/b", "x", "decoy"):
        assert queue.push(decoy, {"decoy": decoy})
    pushed = client.post("/api/v1/tasks", json={"id": task_id, "data": {"me": task_id}})
    assert pushed.status_code == 201, pushed.text
    location = pushed.headers["location"]
    assert location == f"/api/v1/tasks/{quote(task_id, safe='')}?queue=default"
    assert client.get(location).json()["data"] == {"me": task_id}
    retry = location.replace("?", "/retry?")
    canceled = client.delete(location)
    assert canceled.status_code == 200 and canceled.json()["id"] == task_id
    assert client.post(retry).json()["status"] == "pending"
    assert queue.require_task(task_id).status == "pending"
    assert {queue.require_task(d).status for d in ("b", "a/b", "x", "decoy")} == {"pending"}


@pytest.mark.parametrize("task_id", [".", ".."])
def test_the_ids_dot_and_dot_dot_are_refused_at_push(client: TestClient, task_id: str) -> None:
    answer = client.post("/api/v1/tasks", json={"id": task_id, "data": 1})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "id"]


def test_unencoded_slashes_still_work_except_a_trailing_retry(
    client: TestClient, queue: QueueManager
) -> None:
    assert queue.push("meetings/2024/weekly", 1) and queue.push("x/retry", 2)
    assert client.get("/api/v1/tasks/meetings/2024/weekly").json()["data"] == 1
    assert client.get("/api/v1/tasks/x%2Fretry").json()["data"] == 2
    assert client.get("/api/v1/tasks/x/retry").status_code == 405  # the retry of "x"


def test_a_validation_error_never_echoes_its_input(client: TestClient) -> None:
    huge: Any = {"data": 1, "priority": "x" * 100_000}
    answer = client.post("/api/v1/tasks", json=huge)
    assert answer.status_code == 422 and len(answer.content) < 1000
