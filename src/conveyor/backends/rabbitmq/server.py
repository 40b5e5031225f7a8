"""``RabbitMQServer``: one AMQP connection per process and a task store, for every queue."""

from __future__ import annotations

import os
import uuid
from dataclasses import replace

from loguru import logger

from ...errors import ConfigError
from ..base import QueueRecords, QueueStore, Server, StoreConfig
from ..eventlog import EventLog
from ..table import open_server, spec_for_url
from .backend import RabbitMQQueue
from .link import Link
from .topology import DEFAULT_TASK_STORE, Topology, limit_text, parse_url

_announced: set[str] = set()  # default task stores already named in the log (once each)


def default_task_store() -> str:
    """``conveyor-rabbitmq.db`` in the working directory, as an absolute path (logged once,
    since a process started elsewhere would open a different file)."""
    path = os.path.abspath(DEFAULT_TASK_STORE.removeprefix("sqlite:///"))
    if path not in _announced:
        _announced.add(path)
        logger.info(
            "RabbitMQ task store: {} (the default; set task_store to share one store "
            "between processes started in other directories or on other hosts)", path,
        )  # fmt: skip
    return f"sqlite:///{path}"


class RabbitMQServer(Server):
    """A RabbitMQ broker (``amqp://``, ``amqps://``) and the task store that keeps records."""

    def __init__(
        self, url: str, *, connect_timeout: float = 5.0, task_store: str | None = None
    ) -> None:
        broker = parse_url(url)
        self.safe_url = broker.safe_url
        #: Seconds the broker lets a delivery stay unacked (the URL's ``consumer_timeout``).
        self.consumer_timeout = broker.consumer_timeout
        store_url = task_store or broker.task_store or default_task_store()
        if not spec_for_url(store_url).task_store:
            raise ConfigError(
                f"task_store: {store_url.split('://', 1)[0]!r} cannot keep task records; use "
                "sqlite:///path/to/tasks.db or redis://host:6379/0 (RabbitMQ keeps no state)"
            )
        self.task_store = open_server(store_url, connect_timeout=connect_timeout)
        self.registry = self.task_store.registry
        try:
            self.link = Link(
                broker, connect_timeout=connect_timeout,
                name=f"conveyor pid {os.getpid()} {uuid.uuid4().hex[:8]}",
            )  # fmt: skip
        except BaseException:
            self.task_store.close()
            raise

    def store(self, queue_name: str, config: StoreConfig) -> QueueStore:
        topology = Topology.for_queue(queue_name, config.max_priority)
        self.link.declare(topology)
        store = self.task_store.store(queue_name, replace(config, broker_leases=True))
        return RabbitMQQueue(self.link, topology, store, consumer_timeout=self.consumer_timeout)

    def records(self, queue_name: str) -> QueueRecords:
        return self.task_store.records(queue_name)

    def check_time_limit(self, seconds: float | None, what: str) -> None:
        """Refuse a hard time limit the broker would cut short; warn when there is none,
        since a run past ``consumer_timeout`` is delivered a second time."""
        if seconds is not None and seconds > self.consumer_timeout:
            text = limit_text(seconds, self.consumer_timeout, self.safe_url, None)
            raise ConfigError(f"{what}: {text}")
        if seconds is None:
            logger.warning(
                "{} has no hard time limit: on RabbitMQ ({}) a run longer than the broker's "
                "consumer_timeout ({:g}s) is delivered again while it still runs; give it a "
                "timeout", what, self.safe_url, self.consumer_timeout,
            )  # fmt: skip

    def events(self, queue_name: str) -> EventLog:
        """The task store's log: every transition here is a write to the store."""
        return self.task_store.events(queue_name)

    def ping(self) -> None:
        self.link.ping()
        self.task_store.ping()

    def close(self) -> None:
        try:
            self.link.close()
        finally:
            self.task_store.close()
