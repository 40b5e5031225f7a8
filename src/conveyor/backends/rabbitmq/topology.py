"""What the RabbitMQ backend declares, how it reads its URL, and how broker errors read.

Every object is prefixed ``conveyor.`` so an operator (and a test's teardown) can tell them
apart: ``conveyor.<queue>`` is the work queue, a durable classic queue with
``x-max-priority`` and a dead-letter route to ``conveyor.<queue>.dead``, where messages that
cannot be read as a Conveyor ticket end up (the dead-letter *list* of tasks is the task
store's ``failed`` records). The dead-letter exchange is the default exchange, so there is
no shared exchange to create, bind or clean up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ...errors import (
    BrokerAuthenticationError,
    BrokerUnavailableError,
    ConfigError,
    ConveyorError,
)
from ...urls import mask_url

#: The broker's default ``consumer_timeout`` (RabbitMQ 3.8.15+: 30 minutes).
DEFAULT_CONSUMER_TIMEOUT = 1800.0
#: Where task records live when neither the manager nor the URL names a store.
DEFAULT_TASK_STORE = "sqlite:///conveyor-rabbitmq.db"
#: Query parameters that are ours, not pika's: they are removed before pika sees the URL.
_OWN_PARAMETERS = ("task_store", "consumer_timeout")
_MAX_NAME_BYTES = 255  # AMQP short string


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """An ``amqp://`` URL split into what pika reads and the options Conveyor reads."""

    pika_url: str
    safe_url: str
    task_store: str | None
    consumer_timeout: float


def parse_url(url: str) -> BrokerUrl:
    """Split our query parameters (``task_store``, ``consumer_timeout`` in seconds) off."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    own = {key: value for key, value in pairs if key in _OWN_PARAMETERS}
    rest = urlencode([(key, value) for key, value in pairs if key not in _OWN_PARAMETERS])
    pika_url = urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment))
    timeout = DEFAULT_CONSUMER_TIMEOUT
    if "consumer_timeout" in own:
        try:
            timeout = float(own["consumer_timeout"])
        except ValueError:
            timeout = -1.0
        if not timeout > 0:
            raise ConfigError(
                "consumer_timeout: must be the broker's consumer_timeout in seconds (> 0), "
                f"got {own['consumer_timeout']!r} in {mask_url(pika_url)}"
            )
    return BrokerUrl(pika_url, mask_url(pika_url), own.get("task_store") or None, timeout)


@dataclass(frozen=True, slots=True)
class Topology:
    """The queues of one Conveyor queue and the arguments they are declared with."""

    queue: str
    dead: str
    max_priority: int

    @classmethod
    def for_queue(cls, queue_name: str, max_priority: int) -> Topology:
        main = f"conveyor.{queue_name}"
        dead = f"{main}.dead"
        if len(dead.encode("utf-8")) > _MAX_NAME_BYTES:
            raise ConfigError(
                f"queue_name: {queue_name!r} is too long for RabbitMQ (queue names are at most "
                f"{_MAX_NAME_BYTES} bytes, and Conveyor adds 'conveyor.' and '.dead')"
            )
        return cls(main, dead, max_priority)

    def queue_arguments(self) -> dict[str, Any]:
        return {
            "x-max-priority": self.max_priority,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead,
        }


def limit_text(seconds: float, consumer_timeout: float, safe_url: str, task_id: str | None) -> str:
    """Why a hard time limit above the broker's consumer_timeout is refused, and what to do."""
    whose = f" of task {task_id!r}" if task_id else ""
    return (
        f"the hard time limit{whose} ({seconds:g}s) is above the RabbitMQ consumer timeout "
        f"({consumer_timeout:g}s) of {safe_url}: the broker would close the channel while "
        "the task runs and deliver it again. Lower the limit, or raise consumer_timeout on "
        "the broker (rabbitmq.conf, milliseconds) and tell Conveyor with "
        "?consumer_timeout=<seconds> in the URL"
    )


def connect_error(safe_url: str, exc: BaseException) -> ConveyorError:
    """The conveyor error for a connection that could not be opened, saying what to do."""
    import pika.exceptions as pe

    text = str(exc) or type(exc).__name__
    if isinstance(exc, pe.ProbableAuthenticationError) or "ACCESS_REFUSED" in text:
        return BrokerAuthenticationError(
            f"RabbitMQ at {safe_url} refused the credentials ({text}); check the user and "
            "password in the URL (--url, CONVEYOR_URL or RABBITMQ_URL)"
        )
    if isinstance(exc, pe.ProbableAccessDeniedError) or "NOT_ALLOWED" in text:
        return BrokerUnavailableError(
            f"RabbitMQ at {safe_url} denied access to the virtual host ({text}); check the "
            "vhost in the URL or grant the user access (rabbitmqctl set_permissions)"
        )
    return BrokerUnavailableError(
        f"cannot reach RabbitMQ at {safe_url}: {text}. Is rabbitmq-server running there? "
        "Check the URL (--url, CONVEYOR_URL or RABBITMQ_URL)"
    )


def channel_error(safe_url: str, topology: Topology, exc: BaseException) -> ConveyorError:
    """The conveyor error for a channel the broker closed while declaring or using a queue."""
    code = getattr(exc, "reply_code", None)
    text = getattr(exc, "reply_text", None) or str(exc)
    if code == 406 and "inequivalent arg" in text:
        return ConfigError(
            f"RabbitMQ queue {topology.queue!r} at {safe_url} already exists with other "
            f"arguments (the broker says: {text}). Open it with the settings it was declared "
            f"with (max_priority={topology.max_priority} now), or delete it so Conveyor can "
            f"declare it again: rabbitmqctl delete_queue {topology.queue} (its messages are "
            "lost; the task store keeps the records)"
        )
    if code == 403:
        return BrokerUnavailableError(
            f"RabbitMQ at {safe_url} refused access to {topology.queue!r} ({text}); grant the "
            "user configure/write/read permissions on 'conveyor\\..*' (rabbitmqctl "
            "set_permissions)"
        )
    return BrokerUnavailableError(f"RabbitMQ at {safe_url} closed a channel: {text}")
