"""The MQTT status bridge (``conveyor mqtt``): every task event becomes the task's status
on ``conveyor/{queue}/tasks/{id}/status``, retained, so a producer subscribes instead of
polling ``get_task``.

* **Order and resume.** Events are published in each queue's log order. The bridge's cursor
  (the position in every followed log) is written to a state file (atomically, by
  ``os.replace``) once the broker acknowledged the publishes before it, so a restarted
  bridge resumes after the last published event: at least once, never a gap (a trimmed log
  gives a ``reset``, after which the current status of every live task is published again).
* **Retained, then cleared.** Each status is retained (a late subscriber gets the latest).
  When a finished task's record is gone (expired after ``result_ttl`` or purged), the bridge
  publishes an empty retained message on its topic, which deletes the retained status, so
  the broker does not keep topics forever. Finished tasks waiting for that check are kept in
  the state file too.
* **Topics.** A queue name or task id may hold ``/``, ``+`` or ``#``, which MQTT reads as
  levels or wildcards: each is percent-encoded (``urllib.parse.quote(..., safe="")``).
* **Connection.** paho-mqtt's own loop thread reconnects with backoff (1 s to 30 s); while
  the broker is away the bridge waits and publishes nothing, then goes on from its cursor.
  ``mqtt://user:pass@host:1883`` or ``mqtts://`` (TLS, with the system CAs or ``ca_file``,
  optionally a client certificate).
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from loguru import logger

from ..backends.base import QueueRecords
from ..backends.eventlog import RESET, EventLog, LiveEvent
from ..errors import BrokerUnavailableError, ConfigError
from ..lifecycle import FINISHED_STATUSES
from ..urls import mask_url
from .cursor import decode_cursor, encode_cursor
from .follow import Follower

_SAVE_EVERY = 0.5  # seconds between writes of the state file while events flow
_PUBLISH_TIMEOUT = 10.0
_MAX_INFLIGHT = 2000  # messages published but not yet acknowledged, before the bridge waits


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    """Where and how to connect: ``url`` (mqtt:// or mqtts://), TLS files, QoS, client id."""

    url: str = "mqtt://127.0.0.1:1883"
    qos: int = 1
    client_id: str = ""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # TLS without checking the broker's certificate (tests only)
    topic_prefix: str = "conveyor"
    keepalive: int = 30

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2):
            raise ConfigError(f"mqtt qos must be 0, 1 or 2, got {self.qos}")
        scheme = urlsplit(self.url).scheme
        if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(
                f"mqtt broker URL {mask_url(self.url)!r}: use mqtt://[user:pass@]host[:1883] "
                "or mqtts://[user:pass@]host[:8883]"
            )


def status_topic(prefix: str, queue: str, task_id: str) -> str:
    return f"{prefix}/{quote(queue, safe='')}/tasks/{quote(task_id, safe='')}/status"


def status_payload(event: LiveEvent) -> bytes:
    body = {
        "queue": event.queue, "id": event.task_id, "status": event.status,
        "event": event.event, "attempt": event.attempt, "progress": event.progress,
        "at": event.at, "worker": event.worker, "note": event.note, "event_id": event.id,
    }  # fmt: skip
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class _State:
    """What survives a restart: the cursor, and finished tasks whose topic is still set."""

    cursor: dict[str, str] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)  # "queue\ttask" -> finished at

    @classmethod
    def load(cls, path: Path) -> _State:
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
            return cls(decode_cursor(raw["cursor"]) if raw.get("cursor") else {},
                       {str(k): float(v) for k, v in raw.get("finished", {}).items()})  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            raise ConfigError(
                f"mqtt state file {path} is unreadable ({exc}); move it away to start from "
                "the current events (statuses already published stay retained)"
            ) from None

    def save(self, path: Path) -> None:
        body = {"cursor": encode_cursor(self.cursor), "finished": self.finished}
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(json.dumps(body))
        os.replace(temp, path)


class MqttBridge:
    """Publishes the events of ``logs`` to the broker until :meth:`stop`."""

    def __init__(
        self,
        logs: Sequence[EventLog],
        records: Callable[[str], QueueRecords],
        options: BrokerOptions,
        state_path: str | Path,
        *,
        result_ttl: float,
        sweep_every: float = 60.0,
    ) -> None:
        self.logs = list(logs)
        self.records = records
        self.options = options
        self.state_path = Path(state_path)
        self.state = _State.load(self.state_path)
        self.result_ttl = result_ttl
        self.sweep_every = sweep_every
        self.published = 0
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._inflight: deque[tuple[Any, dict[str, str] | None]] = deque()
        self._moved = False  # the cursor advanced since the last save
        self._client = self._make_client()

    # -- the connection ---------------------------------------------------------------------

    def _make_client(self) -> Any:
        try:
            from paho.mqtt.client import Client
            from paho.mqtt.enums import CallbackAPIVersion
        except ImportError as exc:
            raise ConfigError(
                f"the MQTT bridge needs the 'mqtt' extra ({exc.name} is not installed): "
                "pip install 'conveyor[mqtt]'"
            ) from None
        options = self.options
        parts = urlsplit(options.url)
        client = Client(CallbackAPIVersion.VERSION2, client_id=options.client_id,
                        clean_session=True)  # fmt: skip
        if parts.username:
            client.username_pw_set(unquote(parts.username), unquote(parts.password or ""))
        if parts.scheme in ("mqtts", "ssl"):
            client.tls_set(
                ca_certs=options.ca_file, certfile=options.cert_file, keyfile=options.key_file,
                cert_reqs=ssl.CERT_NONE if options.insecure else ssl.CERT_REQUIRED,
            )  # fmt: skip
            client.tls_insecure_set(options.insecure)
        client.reconnect_delay_set(1, 30)
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)
        return client

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            logger.warning("mqtt: broker {} refused the connection: {}", self._where(), reason)
            return
        logger.info("mqtt: connected to {}", self._where())
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       props: Any) -> None:  # fmt: skip
        self._connected.clear()
        if not self._stop.is_set():
            logger.warning("mqtt: lost {} ({}); reconnecting", self._where(), reason)

    def _where(self) -> str:
        return mask_url(self.options.url)

    def start(self, connect_timeout: float = 10.0) -> None:
        """Pin where a log without a saved position starts (its tail now, not when
        :meth:`run` first reads: events in between would be skipped), then connect (the
        loop thread reconnects by itself afterwards)."""
        for log in self.logs:
            if not self.state.cursor.get(log.queue_name):
                self.state.cursor[log.queue_name] = log.tail()
        try:
            self._client.connect_async(self._host, self._port, self.options.keepalive)
        except (OSError, ValueError) as exc:
            raise BrokerUnavailableError(f"mqtt broker {self._where()}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(connect_timeout):
            logger.warning("mqtt: {} does not answer yet; retrying in the background",
                           self._where())  # fmt: skip

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._client.disconnect()
        self._client.loop_stop()

    # -- publishing -------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes) -> None:
        self._publish_many([(topic, payload)])

    def _publish_many(self, items: list[tuple[str, bytes]]) -> None:
        """Publish in order and wait for the broker's acknowledgements (QoS 1, 2), all sent
        before the first wait (one round trip per batch, not per message). Whatever was
        not acknowledged (a disconnect) is sent again, in order, once reconnected."""
        pending = items
        while pending and not self._stop.is_set():
            if not self._connected.wait(1.0):
                continue
            sent = [self._client.publish(topic, payload, qos=self.options.qos, retain=True)
                    for topic, payload in pending]  # fmt: skip
            done = 0
            for info in sent:
                try:
                    info.wait_for_publish(_PUBLISH_TIMEOUT)
                except (RuntimeError, ValueError):
                    break  # not sent (disconnected meanwhile)
                if not info.is_published():
                    break
                done += 1
            self.published += done
            pending = pending[done:]

    def _note_finished(self, event: LiveEvent) -> None:
        key = f"{event.queue}\t{event.task_id}"
        if event.status in FINISHED_STATUSES:
            self.state.finished[key] = event.at
        else:
            self.state.finished.pop(key, None)

    def _publish_events(self, events: list[LiveEvent]) -> None:
        prefix = self.options.topic_prefix
        self._publish_many([(status_topic(prefix, event.queue, event.task_id),
                             status_payload(event)) for event in events])  # fmt: skip
        for event in events:
            self._note_finished(event)

    def _publish_event(self, event: LiveEvent) -> None:
        self._publish_events([event])

    def _stream(self, events: list[LiveEvent], cursor: dict[str, str]) -> None:
        """Publish without waiting (paho keeps unacknowledged QoS 1/2 messages and sends
        them again after a reconnect, in order); ``cursor`` becomes the saved position
        once every message before it is acknowledged (see :meth:`_settle`)."""
        prefix = self.options.topic_prefix
        for event in events:
            topic = status_topic(prefix, event.queue, event.task_id)
            info = self._client.publish(topic, status_payload(event), qos=self.options.qos,
                                        retain=True)  # fmt: skip
            self._inflight.append((info, None))
            self._note_finished(event)
        self._inflight.append((None, cursor))
        while len(self._inflight) > _MAX_INFLIGHT and not self._stop.is_set():
            self._settle(wait=1.0)

    def _settle(self, wait: float = 0.0) -> None:
        """Drop acknowledged messages from the front; advance the cursor past them."""
        while self._inflight:
            info, cursor = self._inflight[0]
            if info is not None and not self._acknowledged(info, wait):
                return
            self._inflight.popleft()
            if cursor is not None:
                self.state.cursor, self._moved = cursor, True
            else:
                self.published += 1

    def _acknowledged(self, info: Any, wait: float) -> bool:
        if self.options.qos == 0 and info.rc != 0:
            return True  # QoS 0 is at most once: a message dropped while away is gone
        if wait > 0 and not info.is_published():
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(wait)
        return bool(info.is_published())

    def _republish_live(self, queue: str) -> None:
        """After a reset: every task's current status, from the records."""
        records = self.records(queue)
        offset = 0
        while True:
            rows = records.list(None, 500, offset)
            for row in rows:
                event = LiveEvent("", queue, str(row.get("id")), "status",
                                  str(row.get("status") or ""), int(row.get("attempts") or 0),
                                  float(row.get("progress") or 0),
                                  float(row.get("updated_at") or time.time()))  # fmt: skip
                self._publish_event(event)
            if len(rows) < 500:
                return
            offset += 500

    def _sweep(self, everything: bool) -> None:
        """Clear the retained status of finished tasks whose record is gone."""
        now = time.time()
        for key, finished_at in list(self.state.finished.items()):
            if not everything and now - finished_at < self.result_ttl:
                continue
            queue, _, task_id = key.partition("\t")
            if self.records(queue).get(task_id) is None:
                self._publish(status_topic(self.options.topic_prefix, queue, task_id), b"")
                self.state.finished.pop(key, None)

    def run(self) -> None:
        """Follow the logs and publish until :meth:`stop`; saves the state as it goes."""
        follower = Follower(self.logs, self.state.cursor or None, idle=0.5)
        saved = last_sweep = time.monotonic()
        dirty = True
        for batch in follower.batches():
            if self._stop.is_set():
                follower.stop()
                break
            run: list[LiveEvent] = []
            for event in batch:
                if event.event == RESET:
                    self._stream(run, dict(follower.positions))
                    run = []
                    while self._inflight and not self._stop.is_set():
                        self._settle(wait=1.0)
                    self._republish_live(event.queue)
                else:
                    run.append(event)
                follower.accept(event)
            if batch:
                self._stream(run, dict(follower.positions))
            self._settle(wait=0.0 if batch else 0.5)
            dirty, self._moved = dirty or self._moved, False
            now = time.monotonic()
            if now - last_sweep >= self.sweep_every:
                self._sweep(everything=True)
                last_sweep, dirty = now, True
            elif not batch:
                self._sweep(everything=False)
            if dirty and (not batch or now - saved >= _SAVE_EVERY):
                self.state.save(self.state_path)
                saved, dirty = now, False
        follower.stop()
        deadline = time.monotonic() + 5.0  # the last acknowledgements, then the last save
        while self._inflight and time.monotonic() < deadline:
            self._settle(wait=0.5)
        self.state.save(self.state_path)
