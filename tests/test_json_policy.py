"""One policy for JSON that enters Conveyor: size (``queue.max_payload_bytes``) and depth
(``queue.max_json_depth``), checked at every way in, so whatever is accepted can be stored,
read back, listed and rendered; and error texts and progress notes bounded by length.

The Python API is tested here on every backend; the HTTP API and the CLI each get the
deep-payload case (the one that answered 500 and exited 1); the worker's decoding of a
stored too-deep value is tested against raw writes into SQLite and Redis.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from conftest import BACKENDS
from conveyor import ConfigError, QueueManager, TaskStatus, TaskTypeError, TaskValidationError
from conveyor.backends import sqlite_path_from_url
from conveyor.cli import main
from conveyor.records import record_from_row
from conveyor.settings import load_settings
from conveyor.validation import (
    DEFAULT_JSON_DEPTH,
    MAX_JSON_DEPTH,
    MAX_MESSAGE_CHARS,
    MAX_TRACEBACK_CHARS,
    check_depth,
    decode_json,
    encode_json,
)

MakeQueue = Callable[..., QueueManager]


def nested(depth: int, leaf: Any = 1) -> Any:
    """``depth`` lists inside each other around ``leaf`` (built without recursion)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def deep_text(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- the policy itself (pure functions) -------------------------------------------------------


def test_depth_is_counted_in_nested_containers_and_the_limit_is_inclusive() -> None:
    assert encode_json("data", nested(64)) == deep_text(64).replace("[]", "[1]")
    assert encode_json("data", {"a": [{"b": nested(61)}]}, max_depth=64)
    with pytest.raises(TaskValidationError) as caught:
        encode_json("data", nested(65))
    assert caught.value.field == "data"
    assert "65" in caught.value.reason and "64" in caught.value.reason
    assert "queue.max_json_depth" in caught.value.reason


@pytest.mark.parametrize("depth", [300, 5_000, 100_000])
def test_very_deep_values_are_refused_never_a_recursion_error(depth: int) -> None:
    with pytest.raises(TaskValidationError, match="nested"):
        encode_json("data", nested(depth))
    with pytest.raises(TaskValidationError, match="nested"):
        decode_json("data", deep_text(depth))
    with pytest.raises(TaskValidationError, match="nested"):
        check_depth("data", nested(depth), DEFAULT_JSON_DEPTH)


def test_a_value_that_contains_itself_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TaskValidationError, match="data"):
        encode_json("data", loop)


@pytest.mark.parametrize(
    "text", ["NaN", "[Infinity]", '{"x": -Infinity}', "[1e400]", '"\\ud800"', '{"\\udcff": 1}']
)
def test_strict_decoding_refuses_what_could_not_be_written_back(text: str) -> None:
    decode_json("data", text)  # the worker's decoding lets a step see it...
    with pytest.raises(TaskValidationError):
        decode_json("data", text, strict=True)  # ...a read path shows it as damaged


def test_invalid_unicode_in_data_is_refused_naming_the_field() -> None:
    with pytest.raises(TaskValidationError) as caught:
        encode_json("data", {"name": "caf\udce9"})
    assert caught.value.field == "data" and "Unicode" in caught.value.reason


def test_what_the_policy_accepts_renders_in_a_record_inside_a_list_page() -> None:
    """The ceiling exists for this: a record of the deepest data and results allowed, in an
    API list page, still serializes (pydantic refuses about 255 levels)."""
    from conveyor.api.schemas import TaskList

    deepest = nested(MAX_JSON_DEPTH)
    row = {
        "id": "deep", "status": "success", "priority": 5, "created_at": 1.7e9,
        "data": encode_json("data", deepest, max_depth=MAX_JSON_DEPTH),
        "result": encode_json("result", deepest, max_depth=MAX_JSON_DEPTH),
        "steps": encode_json("steps", {"a": deepest}, max_depth=MAX_JSON_DEPTH + 1),
    }  # fmt: skip
    record = record_from_row(row, "q")
    assert record.damage == [] and record.data == deepest
    page = TaskList(queue="q", status=None, limit=1, offset=0, tasks=[record])
    assert json.loads(page.model_dump_json())["tasks"][0]["steps"]["a"] == deepest


def test_the_depth_limit_is_a_setting_with_a_ceiling(tmp_path: Path) -> None:
    assert load_settings().queue.max_json_depth == DEFAULT_JSON_DEPTH
    url = f"sqlite:///{tmp_path}/q.db"
    settings = load_settings(url=url, queue={"max_json_depth": 3})
    with QueueManager.from_settings(settings) as queue:
        assert queue.push("flat", nested(3))
        with pytest.raises(TaskValidationError, match="limit is 3"):
            queue.push("deep", nested(4))
    with pytest.raises(ConfigError, match="max_json_depth"):
        load_settings(queue={"max_json_depth": MAX_JSON_DEPTH + 1})
    with pytest.raises(ConfigError, match="max_json_depth"):
        QueueManager.from_url(url, max_json_depth=0)


# -- the Python API, on every backend -------------------------------------------------------


def test_push_and_push_many_refuse_deep_data_and_write_nothing(queue: QueueManager) -> None:
    with pytest.raises(TaskValidationError) as caught:
        queue.push("deep", nested(65))
    assert caught.value.field == "data"
    with pytest.raises(TaskValidationError) as batch:
        queue.push_many([("ok", 1, 5), ("deep2", nested(100_000), 5)])
    assert batch.value.field == "tasks[1].data"
    assert queue.list_tasks() == [] and queue.get_queue_length() == 0
    assert queue.push("edge", nested(64))
    assert queue.require_task("edge").data == nested(64)


def test_results_checkpoints_and_heartbeats_follow_the_same_policy(
    make_queue: MakeQueue,
) -> None:
    queue = make_queue(max_payload_bytes=2048)
    assert queue.push("task", {"n": 1})
    message = queue.reserve(timeout=2)
    assert message is not None
    with pytest.raises(TaskValidationError, match="result"):
        queue.ack(message, nested(65))
    with pytest.raises(TaskValidationError, match="result"):
        queue.ack(message, "x" * 4096)
    with pytest.raises(TaskValidationError, match="steps"):
        queue.checkpoint(message, {"first": nested(65)})
    assert queue.checkpoint(message, {"first": nested(64)})  # a result at the limit fits
    with pytest.raises(TaskValidationError, match="info"):
        queue.register_worker("w1", {"current": nested(100)}, ttl=5)
    record = queue.require_task("task")
    assert record.status == TaskStatus.PROCESSING, "a refused result leaves the task held"
    assert record.steps == {"first": nested(64)}
    assert queue.ack(message, {"words": 3})


def test_errors_and_progress_notes_are_cut_never_refused(queue: QueueManager) -> None:
    assert queue.push("noisy", 1)
    message = queue.reserve(timeout=2)
    assert message is not None
    assert queue.set_progress(message, 0.5, "é" * (MAX_MESSAGE_CHARS * 3))
    note = queue.require_task("noisy").progress_message
    assert note is not None and len(note) < MAX_MESSAGE_CHARS + 100 and "characters cut" in note

    long_trace = "".join(f'  File "step.py", line {n}, in deep\n' for n in range(20_000))
    error = {"type": "Boom", "message": "m" * 100_000, "traceback": long_trace + "Boom: end\n"}
    assert queue.nack(message, error=error)
    record = queue.require_task("noisy")
    assert record.error is not None and record.error.traceback is not None
    assert len(record.error.message) < MAX_MESSAGE_CHARS + 100
    assert "characters cut" in record.error.message
    trace = record.error.traceback
    assert len(trace) < MAX_TRACEBACK_CHARS + 100
    assert trace.startswith('  File "step.py", line 0') and trace.endswith("Boom: end\n")
    assert "characters cut" in trace

    message = queue.reserve(timeout=2)
    assert message is not None
    odd = {"type": ["not", "text"], "message": "bad \udcff byte", "traceback": 42}
    assert queue.fail(message, reason="error", error=odd)
    failed = queue.require_task("noisy")
    assert failed.error is not None and failed.damage == []
    assert failed.error.message == "bad \\udcff byte" and failed.error.traceback == "42"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        pytest.param({"max_retries": 2**63}, "max_retries", id="max-retries-2^63"),
        pytest.param({"max_retries": 2**31}, "max_retries", id="max-retries-2^31"),
        pytest.param({"retry_backoff": 1e300}, "retry_backoff", id="backoff-1e300"),
        pytest.param({"queue_timeout": float("inf")}, "queue_timeout", id="timeout-inf"),
        pytest.param({"process_timeout": 10**400}, "process_timeout", id="timeout-huge-int"),
    ],
)
def test_numbers_that_would_overflow_are_validation_errors(
    queue: QueueManager, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(TaskValidationError) as caught:
        queue.push("big", 1, **options)
    assert caught.value.field == field
    assert queue.get_task("big") is None


def test_a_step_result_that_is_not_json_is_a_type_error(queue: QueueManager) -> None:
    assert queue.push("t", 1)
    message = queue.reserve(timeout=2)
    assert message is not None
    with pytest.raises(TaskTypeError, match="result"):
        queue.ack(message, object())


# -- the worker's decoding of what it reads from storage ---------------------------------------


def _damage_sqlite(url: str, queue: QueueManager, field: str, value: str) -> None:
    with closing(sqlite3.connect(sqlite_path_from_url(url), timeout=10)) as db, db:
        assert (
            db.execute(
                f"UPDATE tasks SET {field} = ? WHERE queue = ? AND id = 'bad'",
                (value, queue.queue_name),
            ).rowcount
            == 1
        )


def _damage_redis(url: str, queue: QueueManager, field: str, value: str) -> None:
    import redis

    with closing(redis.Redis.from_url(url)) as client:
        key = f"conveyor:{{{queue.queue_name}}}:task:bad"
        assert client.exists(key) == 1
        client.hset(key, field, value)


@pytest.mark.parametrize(
    ("backend_name", "field"),
    [
        pytest.param(backend, field, id=f"{backend}-{field}", marks=BACKENDS[backend])
        for backend in ("sqlite", "redis")
        for field in ("data", "steps")
    ],
)
def test_a_stored_too_deep_value_is_dead_lettered_and_the_queue_flows(
    queue: QueueManager, backend_url: str, backend_name: str, field: str
) -> None:
    assert queue.push("before", {"n": 1}, priority=5)
    assert queue.push("bad", {"n": 2}, priority=10)
    damage = _damage_sqlite if backend_name == "sqlite" else _damage_redis
    value = deep_text(100_000) if field == "data" else '{"a":' + deep_text(1000) + "}"
    damage(backend_url, queue, field, value)
    assert queue.push("after", {"n": 3}, priority=9)

    got = []
    while (message := queue.reserve(timeout=0.2)) is not None:
        got.append(message.task_id)
        assert queue.ack(message)
    assert got == ["after", "before"]

    dead = queue.require_task("bad")
    assert dead.status == TaskStatus.FAILED and dead.dead_reason == "malformed"
    assert dead.error is not None and "nested" in dead.error.message
    assert f"{field}:" in dead.error.message
    assert any(line.startswith(f"{field}:") for line in dead.damage), dead.damage
    assert queue.stats().counts["failed"] == 1


# -- the CLI and the HTTP API -------------------------------------------------------------------


def test_cli_push_of_deeply_nested_json_exits_2_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONVEYOR_CONFIG", raising=False)
    url = f"sqlite:///{tmp_path}/q.db"
    for depth in (100_000, 300, 65):
        (tmp_path / "deep.json").write_text(json.dumps({"doc": "x"})[:-1] + ', "n": '
                                            + deep_text(depth) + "}")  # fmt: skip
        assert main(["push", "@deep.json", "--url", url]) == 2
        err = capsys.readouterr().err
        assert err.startswith("conveyor: ") and err.count("\n") == 1, err
        assert "nested" in err and "max_json_depth" in err and "Traceback" not in err
    (tmp_path / "many.jsonl").write_text('{"data": 1}\n{"data": ' + deep_text(5000) + "}\n")
    assert main(["push", "--many", "@many.jsonl", "--url", url]) == 2
    assert "line 2" in capsys.readouterr().err
    with QueueManager.from_url(url) as queue:
        assert queue.list_tasks() == []


def test_api_refuses_deep_data_with_422_and_reads_stay_200(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from conveyor.api import create_app
    from conveyor.settings import Settings

    app = create_app(Settings(url=f"sqlite:///{tmp_path}/q.db"))
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        for depth in (65, 300, 900):
            body = '{"id": "d%d", "data": %s}' % (depth, deep_text(depth))  # noqa: UP031
            answer = client.post("/api/v1/tasks", content=body,
                                 headers={"content-type": "application/json"})  # fmt: skip
            assert answer.status_code == 422, answer.text
            assert answer.json()["detail"][0]["loc"] == ["body", "data"]
        unparseable = '{"data": ' + deep_text(100_000) + "}"
        answer = client.post("/api/v1/tasks", content=unparseable,
                             headers={"content-type": "application/json"})  # fmt: skip
        assert answer.status_code == 400, answer.text
        assert (
            client.post("/api/v1/tasks", json={"id": "ok", "data": nested(64)}).status_code == 201
        )
        assert client.get("/api/v1/tasks/ok").json()["data"] == nested(64)
        assert client.get("/api/v1/tasks").status_code == 200
