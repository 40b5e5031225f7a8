"""Backend selection by URL scheme; drivers are imported only when their backend is used."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from ..errors import ConfigError
from ..urls import mask_url
from .base import Backend, Claimed, ClaimResult, NewTask

__all__ = ["Backend", "ClaimResult", "Claimed", "NewTask", "QueueBackend", "open_backend"]


class QueueBackend(StrEnum):
    """The three backends behind one ``QueueManager`` behaviour."""

    SQLITE = "sqlite"
    REDIS = "redis"
    RABBITMQ = "rabbitmq"


_SCHEMES = {
    "sqlite": QueueBackend.SQLITE,
    "redis": QueueBackend.REDIS,
    "rediss": QueueBackend.REDIS,
    "unix": QueueBackend.REDIS,
    "amqp": QueueBackend.RABBITMQ,
    "amqps": QueueBackend.RABBITMQ,
}


def backend_for_url(url: str) -> QueueBackend:
    """Pick the backend a URL names: sqlite:///path, redis://, rediss://, amqp://, amqps://."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    try:
        return _SCHEMES[scheme]
    except KeyError:
        raise ConfigError(
            f"url: cannot tell the backend of {mask_url(url)!r}; use sqlite:///path/to.db, "
            "redis://host:6379/0, rediss://..., amqp://user:pass@host:5672/ or amqps://..."
        ) from None


def sqlite_path_from_url(url: str) -> str:
    """``sqlite:///conveyor.db`` is relative, ``sqlite:////var/lib/c.db`` absolute."""
    path = url.split("://", 1)[1]
    if path.startswith("/"):
        path = path[1:]
    if not path:
        raise ConfigError("url: a sqlite URL needs a file path, e.g. sqlite:///conveyor.db")
    return path


def open_backend(kind: QueueBackend, url: str, queue_name: str, options: dict[str, Any]) -> Backend:
    """Construct the backend for ``kind``; ``options`` are backend-specific keyword arguments."""
    if kind is QueueBackend.SQLITE:
        from .sqlite import SqliteBackend

        backend: Backend = SqliteBackend(sqlite_path_from_url(url), queue_name, **options)
        return backend
    if kind is QueueBackend.REDIS:
        from .redis import RedisBackend

        return RedisBackend(url, queue_name, **options)
    from .rabbitmq import RabbitMQBackend

    return RabbitMQBackend(url, queue_name, **options)
