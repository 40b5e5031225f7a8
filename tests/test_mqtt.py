"""The MQTT status bridge against the real Mosquitto on 127.0.0.1:1883 (or
CONVEYOR_TEST_MQTT_URL): a subscriber sees, in order, every status of a task that retries
once and then succeeds; a restarted bridge resumes after its last published event; a purged
record's retained status is cleared with an empty retained publish."""

from __future__ import annotations

import os
import queue as queue_module
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from api_support import require_modules

require_modules("paho")

import json  # noqa: E402

from paho.mqtt.client import Client  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from conftest import IN_CI, backend_params, unavailable, wait_until  # noqa: E402
from conveyor import QueueManager  # noqa: E402
from conveyor.events.mqtt import BrokerOptions, MqttBridge, status_topic  # noqa: E402

MQTT_URL = os.environ.get("CONVEYOR_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
pytestmark = pytest.mark.parametrize("backend_name", backend_params("sqlite", "redis", "postgres"),
                                     indirect=True)  # fmt: skip


class Subscriber:
    """A real MQTT client collecting (topic, payload, retain) of what it receives."""

    def __init__(self, topic: str) -> None:
        parts = urlsplit(MQTT_URL)
        self.messages: queue_module.Queue[tuple[str, bytes, bool]] = queue_module.Queue()
        self.subscribed = threading.Event()
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex}")
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload, m.retain))
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_connect = lambda c, *args: c.subscribe(topic, qos=1)
        try:
            self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        except OSError as exc:
            if IN_CI:
                raise
            unavailable(f"no MQTT broker at {MQTT_URL}: {exc}")
        self.client.loop_start()
        assert self.subscribed.wait(10), "the subscription was not acknowledged"

    def take(self, timeout: float = 15) -> tuple[str, bytes, bool]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(queue_name: str) -> Iterator[Callable[[str], Subscriber]]:
    made: list[Subscriber] = []

    def make(task_id: str = "+") -> Subscriber:
        topic = status_topic("conveyor", queue_name, "x").replace("/x/", f"/{task_id}/")
        made.append(Subscriber(topic))  # "+" stays a wildcard
        return made[-1]

    yield make
    for each in made:
        each.close()


class RunningBridge:
    def __init__(self, queue: QueueManager, state: Path, *, follow: bool = True,
                 **options: Any) -> None:  # fmt: skip
        server = queue.server
        self.bridge = MqttBridge([server.events(queue.queue_name)], server.records,
                                 BrokerOptions(url=MQTT_URL, qos=1), state,
                                 result_ttl=3600, **options)  # fmt: skip
        self.bridge.start()
        self.thread = threading.Thread(target=self.bridge.run, daemon=True)
        if follow:
            self.follow()

    def follow(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.bridge.stop()
        self.thread.join(15)
        self.bridge.close()
        assert not self.thread.is_alive()


def run_task(queue: QueueManager, *, retry_once: bool) -> None:
    message = queue.reserve(timeout=5)
    assert message is not None
    if retry_once:
        assert queue.nack(message, error="first try fails")
        message = queue.reserve(timeout=5)
        assert message is not None
    queue.set_progress(message, 0.5)
    assert queue.ack(message, {"ok": True})


def statuses(sub: Subscriber, until: str) -> list[tuple[str, str]]:
    seen = []
    while True:
        _, payload, _ = sub.take()
        body = json.loads(payload)
        seen.append((body["event"], body["status"]))
        if body["status"] == until:
            return seen


def test_a_subscriber_sees_every_status_in_order_of_a_task_that_retries_once(
    make_queue: Callable[..., QueueManager], subscriber: Callable[[str], Subscriber],
    tmp_path: Path,
) -> None:  # fmt: skip
    queue = make_queue()
    sub = subscriber("job-1")
    bridge = RunningBridge(queue, tmp_path / "bridge.json")
    try:
        assert queue.push("job-1", {"n": 1}, 5)
        run_task(queue, retry_once=True)
        assert statuses(sub, until="success") == [
            ("pushed", "pending"), ("started", "processing"), ("retrying", "pending"),
            ("started", "processing"), ("progress", "processing"), ("succeeded", "success"),
        ]  # fmt: skip
    finally:
        bridge.stop()
    late = subscriber("job-1")  # a late subscriber gets the retained last status
    _, payload, retained = late.take()
    assert retained and json.loads(payload)["status"] == "success"


def test_a_restarted_bridge_resumes_and_a_purged_record_is_cleared(
    make_queue: Callable[..., QueueManager], subscriber: Callable[[str], Subscriber],
    tmp_path: Path,
) -> None:  # fmt: skip
    queue = make_queue()
    state = tmp_path / "bridge.json"
    sub = subscriber("+")
    bridge = RunningBridge(queue, state)
    queue.push("first", {}, 1)
    run_task(queue, retry_once=False)
    assert statuses(sub, until="success")[-1] == ("succeeded", "success")
    bridge.stop()
    queue.push("second", {}, 1)  # while the bridge is down
    run_task(queue, retry_once=False)
    bridge = RunningBridge(queue, state, sweep_every=0.2)
    try:
        seen = statuses(sub, until="success")
        assert seen[0] == ("pushed", "pending")  # resumed right after its last event
        assert queue.delete_finished("success") == 2
        cleared = set()
        while len(cleared) < 2:
            topic, payload, _ = sub.take()
            if payload == b"":
                cleared.add(topic)
        assert cleared == {status_topic("conveyor", queue.queue_name, task_id)
                           for task_id in ("first", "second")}  # fmt: skip
        wait_until(lambda: not json.loads(state.read_text())["finished"], timeout=10)
    finally:
        bridge.stop()


def test_events_between_start_and_the_first_read_are_published(
    make_queue: Callable[..., QueueManager], subscriber: Callable[[str], Subscriber],
    tmp_path: Path,
) -> None:  # fmt: skip
    """A fresh bridge starts at the logs' tails as they were at ``start()``, not at its
    first read: a task pushed in between (the API answering before the loop runs) keeps
    its ``pushed`` status."""
    queue = make_queue()
    sub = subscriber("early")
    bridge = RunningBridge(queue, tmp_path / "bridge.json", follow=False)
    try:
        assert queue.push("early", {}, 1)
        run_task(queue, retry_once=False)
        bridge.follow()
        assert statuses(sub, until="success")[0] == ("pushed", "pending")
    finally:
        bridge.stop()
