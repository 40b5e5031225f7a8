"""Live task events on every task store: the event log, ``events()``/``wait()``, the SSE
route (cut mid-stream and resumed with Last-Event-ID: none missed, none twice), a ``reset``
when events were trimmed, and /metrics counters that never go down after a purge."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from api_support import clear_conveyor_env, require_modules

require_modules("fastapi", "uvicorn", "httpx", "sse_starlette")

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from conftest import DEFAULT_BACKENDS, backend_params  # noqa: E402
from conveyor import QueueManager  # noqa: E402
from conveyor.backends.eventlog import RESET  # noqa: E402
from conveyor.backends.sqlite import events_sql  # noqa: E402
from conveyor.settings import Settings  # noqa: E402
from events_support import serve_app, sse_events  # noqa: E402

#: RabbitMQ's events are its task store's (SQLite by default here): the same log.
#: PostgreSQL always runs here: its log is its own (triggers, read behind the oldest
#: running transaction).
EVENT_BACKENDS = backend_params(*dict.fromkeys((*DEFAULT_BACKENDS, "postgres")))
pytestmark = pytest.mark.parametrize("backend_name", EVENT_BACKENDS, indirect=True)
TOKEN = "events-test-token"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_conveyor_env(monkeypatch)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def api(backend_url: str, queue_name: str) -> Iterator[str]:
    settings = Settings(url=backend_url, queue={"name": queue_name}, api={"token": TOKEN})
    base, stop = serve_app(settings)
    yield base
    stop()


def run_once(queue: QueueManager, *, fail_first: bool = False) -> None:
    """Reserve one task and settle it: progress, then ack (or a counted nack first)."""
    message = queue.reserve(timeout=5)
    assert message is not None
    queue.set_progress(message, 0.5, "half")
    if fail_first:
        queue.nack(message)
        message = queue.reserve(timeout=5)
        assert message is not None
    queue.ack(message, {"ok": True})


def all_events(queue: QueueManager) -> list[tuple[str, str]]:
    """Every event the queue's log holds, oldest first, as (task id, event)."""
    log = queue.server.events(queue.queue_name)
    found, after = [], "0"
    try:
        while True:
            batch = log.read(after, 500, 0)
            if not batch:
                return found
            found += [(e.task_id, e.event) for e in batch if e.event != RESET]
            after = batch[-1].id
    finally:
        log.close()


def test_every_transition_is_an_event_and_wait_returns_the_final_record(
    make_queue: Callable[..., QueueManager],
) -> None:
    queue, worker = make_queue(), make_queue()
    seen: list[tuple[str, str, str]] = []
    started = threading.Event()

    def follow() -> None:
        events = queue.for_queue(queue.queue_name).events(task_id="a")
        started.set()
        for event in events:
            seen.append((event.event, event.status, event.task_id))
            if event.event == "succeeded":
                return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    assert started.wait(10)
    queue.push("b", {}, 1)
    queue.push("a", {}, 9)
    done = threading.Thread(target=run_once, args=(worker,), kwargs={"fail_first": True})
    done.start()
    record = queue.wait("a", timeout=30)
    done.join(10)
    assert record is not None and record.status == "success"
    reader.join(10)
    assert [event for event, _, _ in seen][-5:] == [
        "started", "progress", "retrying", "started", "succeeded"]  # fmt: skip
    assert {task for _, _, task in seen} == {"a"}
    assert queue.wait("b", timeout=0.2) is None  # still pending: no final record yet


def test_sse_cut_and_resumed_with_last_event_id_misses_none_and_repeats_none(
    api: str, make_queue: Callable[..., QueueManager], queue_name: str
) -> None:
    queue = make_queue()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    got: list[dict[str, Any]] = []
    with httpx.Client(base_url=api, headers=headers, timeout=30) as client:
        assert client.get("/api/v1/events", headers={"Authorization": ""}).status_code == 401
        with client.stream("GET", "/api/v1/events", params={"queue": queue_name}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for i in range(6):
                queue.push(f"t{i}", {"i": i}, 1)
            for event in sse_events(response):
                got.append(event)
                if len(got) == 4:
                    break  # cut off mid-stream, with more events already sent
        last_id = got[-1]["id"]
        for _ in range(6):  # while disconnected: more transitions
            run_once(queue)
        expected = all_events(queue)
        resumed = {"Last-Event-ID": last_id}
        with client.stream("GET", "/api/v1/events", params={"queue": queue_name},
                           headers=resumed) as response:  # fmt: skip
            for event in sse_events(response):
                got.append(event)
                if len(got) == len(expected):
                    break
    pairs = [(event["data"]["task_id"], event["data"]["event"]) for event in got]
    assert pairs == expected
    assert len({event["id"] for event in got}) == len(got)
    assert expected.count(("t0", "succeeded")) == 1


def test_a_reader_whose_position_was_trimmed_gets_a_reset(
    make_queue: Callable[..., QueueManager], backend_url: str
) -> None:
    if backend_url.startswith("amqp"):
        pytest.skip("the task store's log: covered on sqlite, redis and postgres")
    queue = make_queue()
    log = queue.server.events(queue.queue_name)
    start = log.tail()
    if backend_url.startswith("sqlite"):  # trimmed to the last 50 events
        db = queue.server.database.db()  # type: ignore[attr-defined]
        for chunk in range(4):
            queue.push_many([(f"t{chunk}-{i}", {}, 1) for i in range(50)])
            events_sql.trim(db, kept=50)
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 50
        assert log.counters() == {"pushed": 200}  # trimmed events stay counted
    elif backend_url.startswith("postgres"):  # trimmed to the queue's last 50 events
        from conveyor.backends.postgres import events_sql as pg_events

        database = queue.server.database  # type: ignore[attr-defined]
        for chunk in range(4):
            queue.push_many([(f"t{chunk}-{i}", {}, 1) for i in range(50)])
            pg_events.trim(database, queue.queue_name, kept=50)
        kept = f"SELECT count(*) FROM {database.schema}.events WHERE queue = %s"
        assert database.read(kept, (queue.queue_name,)) == 50
        assert log.counters() == {"pushed": 200}  # trimmed events stay counted
    else:
        for chunk in range(12):  # past the stream's cap (10,000): the oldest are trimmed
            queue.push_many([(f"t{chunk}-{i}", {}, 1) for i in range(1000)])
    first = log.read(start, 10, 0)
    assert first[0].event == RESET
    assert first[1].event == "pushed"
    again = log.read(first[0].id, 1, 0)  # resuming at the reset's id: no second reset
    assert again[0].event == "pushed" and again[0].id == first[1].id
    log.close()


def finished_total(text: str, queue_name: str, outcome: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "conveyor_tasks_finished_total"
                and sample.labels.get("queue") == queue_name
                and sample.labels.get("outcome") == outcome
            ):
                return float(sample.value)
    return 0.0


def test_metrics_counters_never_drop_after_records_are_purged(
    api: str, make_queue: Callable[..., QueueManager], queue_name: str
) -> None:
    queue = make_queue()
    for i in range(3):
        queue.push(f"t{i}", {}, 1)
        run_once(queue)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    before = httpx.get(f"{api}/metrics", headers=headers).text
    assert finished_total(before, queue_name, "success") == 3.0
    assert queue.delete_finished("success") == 3
    queue.clear()
    after = httpx.get(f"{api}/metrics", headers=headers).text
    assert finished_total(after, queue_name, "success") == 3.0
    queue.push("t9", {}, 1)
    run_once(queue)
    later = httpx.get(f"{api}/metrics", headers=headers).text
    assert finished_total(later, queue_name, "success") == 4.0


def test_health_and_worker_stop_routes(api: str, queue: QueueManager) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{api}/api/v1/health").json()["status"] == "ok"
    missing = httpx.post(f"{api}/api/v1/workers/nobody/stop", headers=headers)
    assert missing.status_code == 404
    queue.register_worker("w-1", {"id": "w-1", "queues": [queue.queue_name]}, 60)
    asked = httpx.post(f"{api}/api/v1/workers/w-1/stop", headers=headers)
    assert asked.status_code == 202
    queue.unregister_worker("w-1")


def conveyor(*args: str) -> subprocess.Popen[str]:
    code = "from conveyor.cli import main; raise SystemExit(main())"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_the_cli_watches_a_task_and_prints_events(
    make_queue: Callable[..., QueueManager], backend_url: str, queue_name: str
) -> None:
    queue = make_queue()
    assert queue.push("w1", {}, 1)
    watch = conveyor("task", "watch", "w1", "--url", backend_url, "-q", queue_name,
                     "--timeout", "60")  # fmt: skip
    follow = conveyor("events", "--follow", "--url", backend_url, "-q", queue_name)
    message = queue.reserve(timeout=5)
    assert message is not None
    queue.set_progress(message, 0.4, "almost half")
    assert queue.ack(message, "done")
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, err
    assert "100% success" in out.splitlines()[-1]
    follow.terminate()
    listed = conveyor("events", "--url", backend_url, "-q", queue_name)
    printed, _ = listed.communicate(timeout=60)
    assert [line.split()[3] for line in printed.splitlines()] == [
        "pushed", "started", "progress", "succeeded"]  # fmt: skip
    follow.communicate(timeout=30)


def test_a_closed_sqlite_event_log_reads_nothing_more_and_opens_nothing(
    make_queue: Callable[..., QueueManager], backend_url: str
) -> None:
    """The API closes a log from its event loop while follower threads may be reading it;
    a read after the close must not open the connection again (nor, during it, use the one
    being closed: every use holds the log's lock)."""
    if not backend_url.startswith("sqlite"):
        pytest.skip("SQLite's log: its connection is the log's own")
    queue = make_queue()
    queue.push("t", {"n": 1})
    log = queue.server.events(queue.queue_name)
    assert [event.event for event in log.read("0", 10, 0)] == ["pushed"]
    log.close()
    assert log.read("0", 10, 5.0) == []  # at once, not after the 5 s block
    assert log.tail() == "0" and log.counters() == {}
    assert log._own is None  # type: ignore[attr-defined]
