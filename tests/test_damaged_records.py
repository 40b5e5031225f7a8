"""Read paths tolerate damage: a damaged record or heartbeat is shown as damaged, never a 500,
never a crash.

The decoders are pure functions (``record_from_row``, ``heartbeat_from``), so hypothesis
feeds them arbitrary stored values (any text, invalid Unicode, bytes, huge and non-finite
numbers, JSON of any shape and depth) with no backend; each result must render as the API
renders it and as the CLI prints it. Then damage written by hand into real SQLite and Redis
must leave every read endpoint at 200 and every CLI command working.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api_support import MakeClient, clear_conveyor_env, client_factory, require_modules
from conftest import BACKENDS
from conveyor import QueueManager, TaskRecord, TaskStatus
from conveyor.backends import sqlite_path_from_url
from conveyor.backends.base import ROW_FIELDS
from conveyor.cli import main
from conveyor.cli.overview import show_record
from conveyor.heartbeat import heartbeat_from
from conveyor.records import record_from_row

require_modules("fastapi", "httpx")

from conveyor.api.schemas import TaskList, WorkerInfo, WorkerList  # noqa: E402

PROPERTIES = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

# -- arbitrary stored values ----------------------------------------------------------------------

#: Any text, lone surrogates included (what Redis hands back for invalid UTF-8 bytes).
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=20,
)
special = st.sampled_from(
    ["inf", "-inf", "nan", "NaN", "1e400", "-1e400", "1e300", "abc", "", " ", "1e18",
     "9" * 5000, "[" * 5000, "[" * 100_000 + "]" * 100_000, '{"a": NaN}', "\udcff\udcfe",
     "null", "[]", "5", '"text"', "\x1b[2J", "-0", "0x10", "1_000"]
)  # fmt: skip
numbers = (
    st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.sampled_from([math.inf, -math.inf, math.nan, 1e300, -1e300, 10**400])
)
stored = (
    st.none()
    | any_text
    | st.binary(max_size=40)
    | numbers
    | special
    | json_values.map(lambda v: json.dumps(v, ensure_ascii=False))
    | json_values.map(lambda v: json.dumps(v).replace("NaN", "1e400"))
)
history_line = st.fixed_dictionaries(
    {}, optional={"at": stored | numbers, "event": stored, "attempt": stored | numbers,
                  "note": json_values}
).map(lambda d: json.dumps(d, default=str))  # fmt: skip
rows = st.fixed_dictionaries(
    {},
    optional={
        **{field: stored for field in ROW_FIELDS if field != "history"},
        "history": stored | st.lists(history_line | stored.map(str), max_size=5).map("\n".join),
    },
)
#: A worker's heartbeat keys, and one it does not write.
HEARTBEAT_KEYS = (
    "id host pid queues concurrency state processed failed started_at last_seen current"
)
heartbeats = (
    stored
    | json_values.map(json.dumps)
    | st.fixed_dictionaries(
        {}, optional={key: json_values | numbers for key in [*HEARTBEAT_KEYS.split(), "extra"]}
    ).map(lambda d: json.dumps(d, default=str))
)


# -- what "renders" means -------------------------------------------------------------------------


def as_the_api_answers(value: Any) -> bytes:
    """The bytes a JSON response would carry (Starlette: no NaN, UTF-8)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


def printed(call: Callable[[], Any]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        call()
    return out.getvalue()


def assert_terminal_safe(text: str) -> None:
    unsafe = sorted({ch for ch in text if not ch.isprintable() and ch != "\n"})
    assert not unsafe, f"unescaped characters reached the terminal: {unsafe!r}"


def assert_renders(record: TaskRecord) -> None:
    as_the_api_answers(record.model_dump(mode="json"))
    page = TaskList(queue="q", status=None, limit=1, offset=0, tasks=[record])
    as_the_api_answers(json.loads(page.model_dump_json()))
    assert_terminal_safe(printed(lambda: show_record(record)))


# -- the pure decoders, under hypothesis ----------------------------------------------------------


@PROPERTIES
@given(row=rows)
def test_any_stored_row_decodes_to_a_record_that_renders(row: dict[str, Any]) -> None:
    record = record_from_row(row, "q")
    assert isinstance(record.status, TaskStatus)
    assert all(isinstance(line, str) and ":" in line for line in record.damage)
    assert_renders(record)


@PROPERTIES
@given(raw=heartbeats)
def test_any_stored_heartbeat_decodes_to_a_worker_that_renders(raw: Any) -> None:
    info = heartbeat_from(raw)
    worker = WorkerInfo.model_validate(info)
    as_the_api_answers(json.loads(WorkerList(workers=[worker]).model_dump_json()))
    assert set(info) == set(WorkerInfo.model_fields)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("priority", "inf", 0), ("priority", "nan", 0), ("priority", "1e400", 0),
        ("priority", "1e300", 0), ("attempts", "abc", 0), ("progress", "nan", 0.0),
        ("created_at", "1e300", None), ("updated_at", 1e300, None), ("max_retries", "1e400", None),
        ("steps", "[1, 2]", {}), ("steps", "5", {}), ("status", "bogus", TaskStatus.FAILED),
        ("retry_backoff", "-inf", None), ("queue", "\udcff\udcfe", "\\xff\\xfe"),
    ],
)  # fmt: skip
def test_each_kind_of_damage_is_named_and_the_record_still_renders(
    field: str, value: Any, expected: Any
) -> None:
    healthy = {"id": "t1", "status": "pending", "priority": 5, "created_at": 1.7e9}
    record = record_from_row({**healthy, field: value}, "q")
    assert any(line.startswith(f"{field}:") for line in record.damage), record.damage
    shown = getattr(record, field)
    if expected is None:
        assert shown is None or (field == "created_at" and shown.timestamp() == 0)
    else:
        assert shown == expected
    assert_renders(record)
    assert "damaged:" in printed(lambda: show_record(record))


def test_a_healthy_row_has_no_damage() -> None:
    row = {"id": "t1", "queue": "q", "status": "success", "priority": "7", "attempts": "1",
           "created_at": "1700000000.5", "data": '{"a": [1, 2]}', "result": '"ok"',
           "steps": '{"one": 1}', "history": '{"at": 1700000000.5, "event": "pushed"}'}  # fmt: skip
    record = record_from_row(row, "q")
    assert record.damage == []
    assert (record.priority, record.data, record.steps) == (7, {"a": [1, 2]}, {"one": 1})
    assert [event.event for event in record.history] == ["pushed"]


@pytest.mark.parametrize("raw", ["[1, 2]", "42", '"text"', "not json", '{"pid": "abc"}'])
def test_a_heartbeat_that_is_not_an_object_is_shown_as_damaged(raw: str) -> None:
    info = heartbeat_from(raw)
    assert info["damage"] and info["state"] == "damaged"
    assert info["queues"] == [] and info["current"] == []


# -- damage written by hand into real backends ----------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_conveyor_env(monkeypatch)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def make_client(backend_url: str, queue_name: str) -> Iterator[MakeClient]:
    yield from client_factory(backend_url, queue_name)


def damage_sqlite(url: str, queue: str, task_id: str, values: dict[str, Any]) -> None:
    with closing(sqlite3.connect(sqlite_path_from_url(url), timeout=10)) as db, db:
        for field, value in values.items():
            db.execute(f"UPDATE tasks SET {field} = ? WHERE queue = ? AND id = ?",
                       (value, queue, task_id))  # fmt: skip
        db.execute("INSERT OR REPLACE INTO workers (id, info, last_seen, expires_at) VALUES "
                   "('w-list', '[1, 2]', 0, 1e12), ('w-num', '42', 0, 1e12)")  # fmt: skip


def damage_redis(url: str, queue: str, task_id: str, values: dict[str, Any]) -> None:
    import redis

    with closing(redis.Redis.from_url(url)) as client:
        key = f"conveyor:{{{queue}}}:task:{task_id}"
        assert client.exists(key)
        client.hset(key, mapping=values)
        for worker, info in (("w-list", "[1, 2]"), ("w-num", "42")):
            client.set(f"conveyor:workers:{worker}", info, ex=60)
            client.zadd("conveyor:workers", {worker: 1e12})


#: One damaged record of each kind; stored as text, as a hand-made edit would.
DAMAGE = {
    "inf-priority": {"priority": "inf"},
    "nan-priority": {"priority": "nan"},
    "huge-priority": {"priority": "1e400"},
    "far-timestamps": {"created_at": "1e300", "updated_at": "1e300", "finished_at": "-1e300"},
    "text-attempts": {"attempts": "abc"},
    "list-steps": {"steps": "[1, 2, 3]"},
    "deep-data": {"data": "[" * 5000 + "]" * 5000},
    "nan-progress": {"progress": "nan", "progress_message": "\x1b[2Jgone"},
    "bad-history": {"history": '{"at": 1e400, "event": "x"}\nnot json\n[1]'},
    "bad-error": {"error": '{"type": ["x"], "message": {"a": 1}, "traceback": 5}'},
}


@pytest.mark.parametrize(
    "backend_name",
    [pytest.param(name, marks=BACKENDS[name]) for name in ("sqlite", "redis")],
)
def test_damaged_records_and_heartbeats_leave_every_read_working(
    make_client: MakeClient,
    queue: QueueManager,
    backend_url: str,
    backend_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = make_client()
    queue_name = queue.queue_name
    damage = damage_sqlite if backend_name == "sqlite" else damage_redis
    for task_id, values in DAMAGE.items():
        assert queue.push(task_id, {"n": 1})
        damage(backend_url, queue_name, task_id, values)
    if backend_name == "redis":  # invalid UTF-8, handed back as surrogate escapes
        damage_redis(backend_url, queue_name, "text-attempts", {"type": b"\xff\xfe"})
    good = queue.push("good", {"n": 2}, priority=1)
    assert good

    try:
        for task_id in [*DAMAGE, "good"]:
            answer = client.get(f"/api/v1/tasks/{task_id}")
            assert answer.status_code == 200, (task_id, answer.text)
            if task_id != "good":
                assert answer.json()["damage"], task_id
        listing = client.get("/api/v1/tasks", params={"limit": 100})
        assert listing.status_code == 200, listing.text
        assert len(listing.json()["tasks"]) == len(DAMAGE) + 1
        for path in ("/api/v1/stats", "/metrics", "/api/v1/workers"):
            assert client.get(path).status_code == 200, path
        workers = client.get("/api/v1/workers").json()["workers"]
        assert sum(1 for w in workers if w["damage"]) >= 2

        url = ["--url", backend_url, "--queue", queue_name]
        for argv in (["task", "show", "inf-priority"], ["task", "show", "nan-progress"],
                     ["task", "show", "bad-error", "--json"], ["status"], ["workers"],
                     ["workers", "--json"], ["queues"], ["dead", "list"]):  # fmt: skip
            code = main([*argv, *url] if argv[0] != "queues" else [*argv, "--url", backend_url])
            captured = capsys.readouterr()
            assert code == 0, (argv, captured.err)
            assert "\x1b" not in captured.out and "unexpected" not in captured.err, argv
    finally:
        for worker in ("w-list", "w-num"):
            queue.unregister_worker(worker)
