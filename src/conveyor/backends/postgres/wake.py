"""Wake-ups: one LISTEN connection per server, outside the pool, on a thread of its own.

A transition that makes work ready calls ``pg_notify(<schema>_wake, queue)``; PostgreSQL
delivers it when that transaction commits. The listener thread counts notifications per
queue and wakes waiting stores through a condition variable. A store notes the count
before it claims and waits for it to change, so a push between its claim and its wait is
never missed. When the listener (re)connects it bumps ``epoch``, which wakes every waiter
once: notifications sent while it was not listening are lost, so they claim again.

``LISTEN`` needs a session of its own: it does not work through PgBouncer in transaction
pooling mode (point the URL at PostgreSQL or a session-pooling PgBouncer).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from contextlib import suppress
from typing import Any

import psycopg

_RETRY_SECONDS = (0.1, 0.2, 0.5, 1.0)
_POLL_SECONDS = 0.5  # how often the thread looks at its stop flag


class Listener:
    """Counts notifications per queue name for every store of one server."""

    def __init__(self, conninfo: str, options: dict[str, Any], channel: str) -> None:
        self._conninfo, self._options, self._channel = conninfo, options, channel
        self._changed = threading.Condition()
        self._counts: defaultdict[str, int] = defaultdict(int)
        self.epoch = 0  # bumped on each (re)connect: every waiter claims again
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def mark(self, queue: str) -> tuple[int, int]:
        """What a store saw before it claimed: compare with it in :meth:`wait`."""
        with self._changed:
            return self.epoch, self._counts[queue]

    def wait(self, queue: str, seen: tuple[int, int], timeout: float) -> None:
        """Return when ``queue`` was notified since ``seen``, or after ``timeout``."""
        self._start()
        with self._changed:
            self._changed.wait_for(lambda: (self.epoch, self._counts[queue]) != seen, timeout)

    def _start(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(
                target=self._run, name=f"conveyor-listen-{self._channel}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, **self._options) as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    failures = 0
                    self._bump(None)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=_POLL_SECONDS):
                            self._bump(note.payload)
            except psycopg.Error:
                delay = _RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)]
                failures += 1
                self._stop.wait(delay)

    def _bump(self, queue: str | None) -> None:
        with self._changed:
            if queue is None:
                self.epoch += 1
            else:
                self._counts[queue] += 1
            self._changed.notify_all()

    def close(self) -> None:
        """Stop the thread; it closes its connection within ``_POLL_SECONDS``."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            with suppress(RuntimeError):
                thread.join(timeout=2 * _POLL_SECONDS)
