"""A producer's mistakes raise a clear error naming the field, and nothing is half-written.

``TaskValidationError`` is a ``ValueError`` (a bad value), ``TaskTypeError`` a ``TypeError``
(a wrong type); both carry ``field``. Every case runs on every backend, because "nothing is
written" is a property of the backend as much as of the validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor import QueueManager, TaskTypeError, TaskValidationError

MakeQueue = Callable[..., QueueManager]


class Opaque:
    """An object JSON cannot carry."""


@pytest.fixture
def seeded(queue: QueueManager) -> QueueManager:
    """A queue holding one good task, so "unchanged" is not trivially "empty"."""
    assert queue.push("good", {"ok": True}, priority=5)
    return queue


def assert_nothing_written(queue: QueueManager, task_id: str) -> None:
    assert queue.get_queue_length() == 1
    assert queue.get_task(task_id) is None
    assert {record.id for record in queue.list_tasks()} == {"good"}


@pytest.mark.parametrize(
    ("priority", "error"),
    [
        pytest.param(11, TaskValidationError, id="above-max"),
        pytest.param(-1, TaskValidationError, id="negative"),
        pytest.param("5", TaskTypeError, id="string"),
        pytest.param(5.5, TaskTypeError, id="float"),
        pytest.param(True, TaskTypeError, id="bool"),
        pytest.param(None, TaskTypeError, id="none"),
    ],
)
def test_bad_priority_is_refused_naming_the_field(
    seeded: QueueManager, priority: Any, error: type[Exception]
) -> None:
    with pytest.raises(error) as caught:
        seeded.push("bad", {"x": 1}, priority=priority)
    assert isinstance(caught.value, ValueError if error is TaskValidationError else TypeError)
    assert caught.value.field == "priority"  # type: ignore[attr-defined]
    assert "priority" in str(caught.value)
    assert_nothing_written(seeded, "bad")


def test_max_priority_is_configurable(make_queue: MakeQueue) -> None:
    queue = make_queue(max_priority=3)
    assert queue.push("top", 1, priority=3)
    with pytest.raises(TaskValidationError, match="priority"):
        queue.push("over", 1, priority=4)
    assert queue.get_queue_length() == 1 and queue.get_task("over") is None


@pytest.mark.parametrize(
    ("data", "error"),
    [
        pytest.param({1, 2}, TaskTypeError, id="set"),
        pytest.param(Opaque(), TaskTypeError, id="object"),
        pytest.param({"when": datetime(2024, 1, 1)}, TaskTypeError, id="nested-datetime"),
        pytest.param(b"bytes", TaskTypeError, id="bytes"),
        pytest.param(math.nan, TaskValidationError, id="nan"),
        pytest.param({"x": [math.inf]}, TaskValidationError, id="nested-infinity"),
    ],
)
def test_data_that_is_not_json_is_refused_naming_the_field(
    seeded: QueueManager, data: Any, error: type[Exception]
) -> None:
    with pytest.raises(error) as caught:
        seeded.push("bad", data)
    assert isinstance(caught.value, ValueError if error is TaskValidationError else TypeError)
    assert caught.value.field == "data"  # type: ignore[attr-defined]
    assert "data" in str(caught.value)
    assert_nothing_written(seeded, "bad")


def test_data_over_max_payload_bytes_is_refused_and_the_limit_is_inclusive(
    make_queue: MakeQueue,
) -> None:
    queue = make_queue(max_payload_bytes=1024)
    assert queue.push("good", "x" * 1022)  # '"' + 1022 + '"' = exactly 1024 bytes of JSON
    with pytest.raises(TaskValidationError) as caught:
        queue.push("big", "x" * 1023)
    assert caught.value.field == "data"
    assert "1024" in str(caught.value) and "max_payload_bytes" in str(caught.value)
    with pytest.raises(TaskValidationError, match="data"):
        queue.push("wide", "é" * 600)  # 600 characters but 1202 bytes of UTF-8
    assert_nothing_written(queue, "big")
    assert queue.get_task("wide") is None


def test_default_payload_limit_is_one_mebibyte(queue: QueueManager) -> None:
    with pytest.raises(TaskValidationError, match="data"):
        queue.push("huge", "x" * (1024 * 1024))
    assert queue.get_queue_length() == 0 and queue.get_task("huge") is None


@pytest.mark.parametrize(
    ("task_id", "error"),
    [
        pytest.param("", TaskValidationError, id="empty"),
        pytest.param("   ", TaskValidationError, id="blank"),
        pytest.param("a\nb", TaskValidationError, id="control-character"),
        pytest.param("x" * 201, TaskValidationError, id="too-long"),
        pytest.param(123, TaskTypeError, id="int"),
        pytest.param(b"bytes-id", TaskTypeError, id="bytes"),
    ],
)
def test_bad_task_id_is_refused_naming_the_field(
    seeded: QueueManager, task_id: Any, error: type[Exception]
) -> None:
    with pytest.raises(error) as caught:
        seeded.push(task_id, {"x": 1})
    assert caught.value.field == "task_id"  # type: ignore[attr-defined]
    assert "task_id" in str(caught.value)
    assert seeded.get_queue_length() == 1
    assert {record.id for record in seeded.list_tasks()} == {"good"}


def test_task_id_none_gets_a_generated_id(queue: QueueManager) -> None:
    assert queue.push(None, {"anonymous": 1}) is True
    submitted = queue.submit({"anonymous": 2})
    assert isinstance(submitted, str) and submitted
    assert queue.get_queue_length() == 2
    first = queue.reserve(timeout=1)
    second = queue.reserve(timeout=1)
    assert first is not None and second is not None
    assert first.task_id and first.task_id.strip() and first.task_id != second.task_id
    assert second.task_id == submitted
    assert {first.data["anonymous"], second.data["anonymous"]} == {1, 2}


@pytest.mark.parametrize(
    ("options", "field"),
    [
        pytest.param({"delay": -1}, "delay", id="negative-delay"),
        pytest.param({"delay": math.nan}, "delay", id="nan-delay"),
        pytest.param({"delay": "soon"}, "delay", id="string-delay"),
        pytest.param({"eta": datetime(2030, 1, 1)}, "eta", id="naive-eta"),
        pytest.param({"delay": 1, "eta": 2e9}, "delay", id="delay-and-eta"),
        pytest.param({"max_retries": -1}, "max_retries", id="negative-retries"),
        pytest.param({"queue_timeout": 0}, "queue_timeout", id="zero-queue-timeout"),
        pytest.param({"type": ""}, "type", id="empty-type"),
    ],
)
def test_bad_push_option_is_refused_naming_it(
    seeded: QueueManager, options: dict[str, Any], field: str
) -> None:
    with pytest.raises((ValueError, TypeError)) as caught:
        seeded.push("bad", 1, **options)
    assert field in str(caught.value)
    assert_nothing_written(seeded, "bad")


def test_push_many_with_one_bad_item_writes_nothing_and_names_the_index(
    seeded: QueueManager,
) -> None:
    batch = [
        ("b0", 0, 1),
        {"task_id": "b1", "data": 1, "priority": 2},
        ("b2", 2, 99),
        ("b3", 3, 4),
        ("b4", 4, 5),
    ]
    with pytest.raises(TaskValidationError) as caught:
        seeded.push_many(batch)
    assert "tasks[2]" in str(caught.value) and "priority" in str(caught.value)
    assert caught.value.field == "tasks[2].priority"

    with pytest.raises(TaskTypeError) as caught_type:
        seeded.push_many([("c0", 0, 1), ("c1", 1, 2), {"task_id": "c2", "data": {3}}])
    assert "tasks[2]" in str(caught_type.value) and "data" in str(caught_type.value)

    with pytest.raises(TypeError, match=r"tasks\[1\]"):
        seeded.push_many([("d0", 0, 1), {"task_id": "d1", "data": 1, "prio": 3}])

    assert seeded.get_queue_length() == 1
    for task_id in ("b0", "b1", "b2", "b3", "b4", "c0", "c1", "c2", "d0", "d1"):
        assert seeded.get_task(task_id) is None, task_id
    message = seeded.reserve(timeout=0)
    assert message is not None and message.task_id == "good"
    assert seeded.reserve(timeout=0) is None


def test_bad_result_on_ack_is_refused_and_the_task_stays_held(queue: QueueManager) -> None:
    assert queue.push("task", 1)
    message = queue.reserve(timeout=1)
    assert message is not None
    with pytest.raises(TaskTypeError, match="result"):
        queue.ack(message, result={1, 2})
    record = queue.get_task("task")
    assert record is not None and record.status == "processing"
    assert queue.ack(message, result=[1, 2]) is True


def test_eta_accepts_an_aware_datetime(queue: QueueManager) -> None:
    assert queue.push("aware", 1, eta=datetime.now(UTC) + timedelta(hours=1))
    record = queue.get_task("aware")
    assert record is not None and record.status == "scheduled"
    assert queue.get_queue_length() == 0


@pytest.mark.parametrize(
    ("option", "value"),
    [("delay", 1e300), ("delay", 11 * 365 * 24 * 3600), ("eta", 1e300)],
)
def test_an_absurd_delay_is_refused_and_the_queue_stays_listable(
    queue: QueueManager, option: str, value: float
) -> None:
    """A due time past year 9999 cannot be shown as a date; once stored it would make
    get_task and list_tasks fail for the whole queue, so it is refused at the door."""
    with pytest.raises(TaskValidationError, match=f"^{option}: .*10 years"):
        queue.push("far", {}, 5, **{option: value})
    assert queue.get_task("far") is None
    assert queue.list_tasks() == []
    assert queue.push("near", {}, 5)
    message = queue.reserve()
    assert message is not None
    with pytest.raises(TaskValidationError, match=r"^delay: "):
        queue.nack(message, delay=1e300)
    assert queue.ack(message)
