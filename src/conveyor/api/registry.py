"""The API's queue managers: one per queue, opened on first use, cached, closed at shutdown.

A ``QueueManager`` is not thread-safe and FastAPI runs plain ``def`` endpoints on a thread
pool, so each cached manager has its own lock and is only used while holding it: requests
to one queue take turns, requests to different queues run side by side.

Only a push opens a queue the backend has never seen (on Redis, opening a queue registers
its name for ``conveyor queues``). Reads, cancels and retries on an unknown queue name are
answered without opening anything, so a typo or a probe cannot grow the queue list; and the
cache is bounded, so a client cannot make the API hold a connection per made-up name.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConveyorError
from ..manager import QueueManager, QueueStats
from ..settings import Settings

#: Managers kept open at once; the least recently used one is closed beyond this.
MAX_OPEN_QUEUES = 64


@dataclass
class _Entry:
    manager: QueueManager
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


class QueueRegistry:
    """Managers for the queues of one backend, as described by ``settings``."""

    def __init__(self, settings: Settings, *, max_open: int = MAX_OPEN_QUEUES) -> None:
        self.settings = settings
        self.default_queue = settings.queue.name
        self._max_open = max_open
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self, name: str | None = None) -> Iterator[QueueManager]:
        """The manager of queue ``name`` (default: the configured one), held exclusively.

        Opens the queue if needed: raises ``BrokerUnavailableError`` when the backend cannot
        be reached (nothing is cached then, so the next request tries again).
        """
        name = name or self.default_queue
        while True:
            entry = self._entry(name)
            with entry.lock:
                if entry.closed:  # evicted between lookup and lock: look it up again
                    continue
                yield entry.manager
                return

    @contextlib.contextmanager
    def existing(self, name: str | None) -> Iterator[QueueManager | None]:
        """Like :meth:`use`, but yields None for a queue the backend does not know."""
        if not name or name == self.default_queue or self._is_open(name):
            with self.use(name) as manager:
                yield manager
            return
        if name not in self.known_queues():
            yield None
            return
        with self.use(name) as manager:
            yield manager

    def known_queues(self) -> list[str]:
        """Queue names on the backend, the configured one included."""
        with self.use() as manager:
            names = set(manager.known_queues())
        return sorted(names | {self.default_queue})

    def stats(self, names: list[str] | None = None) -> list[QueueStats]:
        """Stats of the named queues (default: every known queue)."""
        found = []
        for name in names if names is not None else self.known_queues():
            with self.use(name) as manager:
                found.append(manager.stats())
        return found

    def workers(self) -> list[dict[str, Any]]:
        """Live workers on the backend (any queue), as their heartbeats describe them."""
        with self.use() as manager:
            return manager.workers()

    def ping(self) -> None:
        """Raise ``BrokerUnavailableError`` unless the backend answers."""
        with self.use() as manager:
            manager.ping()

    @property
    def backend_url(self) -> str:
        """The backend URL with its password masked."""
        from ..urls import mask_url

        return mask_url(self.settings.backend_url())

    def close(self) -> None:
        """Close every manager (waiting for requests that use one); idempotent. A later
        request opens its queue again (an ASGI server may run the lifespan more than once)."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            self._close_entry(entry)

    # -- internals ------------------------------------------------------------------------

    def _is_open(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def _entry(self, name: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._entries.move_to_end(name)
                return entry
        # Opening connects (Redis pings, with connect_timeout): done outside the lock so a
        # slow backend does not hold up requests for queues that are open already.
        opened = _Entry(QueueManager.from_settings(self.settings, queue_name=name))
        evicted = []
        with self._lock:
            entry = self._entries.setdefault(name, opened)
            if entry is not opened:  # another request opened it meanwhile: use theirs
                evicted.append(opened)
            while len(self._entries) > self._max_open:
                evicted.append(self._entries.popitem(last=False)[1])
        for old in evicted:
            self._close_entry(old)
        return entry

    @staticmethod
    def _close_entry(entry: _Entry) -> None:
        with entry.lock:
            entry.closed = True
            with contextlib.suppress(ConveyorError):
                entry.manager.close()
