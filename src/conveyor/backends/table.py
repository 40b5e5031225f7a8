"""The backend table: URL scheme -> backend, with its default URL. The one place that knows.

``QueueManager``, ``from_url``, the settings and ``conveyor doctor`` all read this table.
A new backend is one module with a :class:`~conveyor.backends.base.Server` class, one row
here (and an enum member beside it), and the conformance suite. Drivers are imported only
when their backend is opened, so a SQLite user never loads redis-py or pika.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..errors import ConfigError
from ..urls import mask_url
from .base import Server


class QueueBackend(StrEnum):
    """The backends behind one ``QueueManager`` behaviour."""

    SQLITE = "sqlite"
    REDIS = "redis"
    RABBITMQ = "rabbitmq"
    POSTGRES = "postgres"


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One row: a backend, the URL schemes that name it, where its Server class lives."""

    kind: QueueBackend
    schemes: tuple[str, ...]
    default_url: str
    server: str  # "module:Class", imported on first use
    example: str  # shown in errors that list the known schemes
    task_store: bool  # can keep the records of a RabbitMQ queue
    extra: str | None = None  # the pip extra its driver comes with, if not a base dependency


BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec(
        QueueBackend.SQLITE, ("sqlite",), "sqlite:///conveyor.db",
        "conveyor.backends.sqlite:SqliteServer", "sqlite:///path/to.db", task_store=True,
    ),
    BackendSpec(
        QueueBackend.REDIS,
        ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel"),
        "redis://localhost:6379/0", "conveyor.backends.redis:RedisServer",
        "redis://host:6379/0 (Cluster: redis+cluster://host:port,host:port/; Sentinel: "
        "redis+sentinel://host:26379,host:26380/SERVICE/0)",
        task_store=True,
    ),
    BackendSpec(
        QueueBackend.RABBITMQ, ("amqp", "amqps"), "amqp://guest:guest@localhost:5672/",
        "conveyor.backends.rabbitmq:RabbitMQServer", "amqp://user:pass@host:5672/",
        task_store=False,
    ),
    BackendSpec(
        QueueBackend.POSTGRES, ("postgresql", "postgres"), "postgresql://localhost:5432/postgres",
        "conveyor.backends.postgres:PostgresServer",
        "postgresql://user:pass@host:5432/db?schema=conveyor", task_store=True, extra="postgres",
    ),
)  # fmt: skip


def known_schemes() -> str:
    """The schemes and an example of each, for error messages."""
    return ", ".join(spec.example for spec in BACKENDS)


def spec_for_kind(kind: QueueBackend | str) -> BackendSpec:
    for spec in BACKENDS:
        if spec.kind == kind:
            return spec
    choices = ", ".join(spec.kind.value for spec in BACKENDS)
    raise ConfigError(f"backend: unknown backend {kind!r}; choose one of {choices}")


def spec_for_url(url: str) -> BackendSpec:
    """The row whose scheme the URL names, or a ConfigError listing the known schemes."""
    scheme = url.split("://", 1)[0].lower() if isinstance(url, str) and "://" in url else ""
    for spec in BACKENDS:
        if scheme in spec.schemes:
            return spec
    raise ConfigError(
        f"url: cannot tell the backend of {mask_url(str(url))!r}; use one of {known_schemes()}"
    )


def backend_for_url(url: str) -> QueueBackend:
    """Pick the backend a URL names."""
    return spec_for_url(url).kind


def task_store_schemes() -> tuple[str, ...]:
    """The schemes of the backends that can keep a RabbitMQ queue's task records."""
    return tuple(scheme for spec in BACKENDS if spec.task_store for scheme in spec.schemes)


def open_server(url: str, **options: Any) -> Server:
    """Open the server a URL names; ``options`` go to its Server class (connect_timeout,
    for Redis durability, for RabbitMQ task_store)."""
    spec = spec_for_url(url)
    module_name, _, class_name = spec.server.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"; install it with: pip install 'conveyor[{spec.extra}]'" if spec.extra else ""
        raise ConfigError(f"the {spec.kind.value} backend cannot load ({exc}){hint}") from None
    server: Server = getattr(module, class_name)(url, **options)
    return server


def sqlite_path_from_url(url: str) -> str:
    """``sqlite:///conveyor.db`` is relative, ``sqlite:////var/lib/c.db`` absolute."""
    path = url.split("://", 1)[1]
    if path.startswith("/"):
        path = path[1:]
    path = path.split("?", 1)[0]
    if not path:
        raise ConfigError("url: a sqlite URL needs a file path, e.g. sqlite:///conveyor.db")
    return path
