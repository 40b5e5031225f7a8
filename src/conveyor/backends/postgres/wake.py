"""Wake-ups: one LISTEN connection per server, outside the pool, on a thread of its own.

A transition that makes work ready calls ``pg_notify(<schema>_wake, queue)``; PostgreSQL
delivers it when that transaction commits. The listener thread counts notifications per
queue and wakes waiting stores through a condition variable. A store notes the count
before it claims and waits for it to change, so a push between its claim and its wait is
never missed. When the listener (re)connects it bumps ``epoch``, which wakes every waiter
once: notifications sent while it was not listening are lost, so they claim again.

A worker that must also watch its children's pipes cannot block on the condition: it
waits on a doorbell instead, the read end of a pipe the listener writes a byte to when
the store's queue is notified (or on a reconnect), so it selects on it with the pipes.

``LISTEN`` needs a session of its own: it does not work through PgBouncer in transaction
pooling mode (point the URL at PostgreSQL or a session-pooling PgBouncer).
"""

from __future__ import annotations

import os
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
        self._bells: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)

    def mark(self, queue: str) -> tuple[int, int]:
        """What a store saw before it claimed: compare with it in :meth:`wait`."""
        with self._changed:
            return self.epoch, self._counts[queue]

    def wait(self, queue: str, seen: tuple[int, int], timeout: float) -> None:
        """Return when ``queue`` was notified since ``seen``, or after ``timeout``."""
        self._start()
        with self._changed:
            self._changed.wait_for(lambda: (self.epoch, self._counts[queue]) != seen, timeout)

    def open_bell(self, queue: str) -> tuple[int, int]:
        """A doorbell for ``queue``: a non-blocking pipe (read end, write end) that the
        listener rings on each notification of the queue and on each reconnect."""
        self._start()
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        with self._changed:
            self._bells[queue].append((read_end, write_end))
        return read_end, write_end

    def ring_if_changed(self, queue: str, seen: tuple[int, int], bell: tuple[int, int]) -> None:
        """Ring ``bell`` now if ``queue`` was notified since ``seen`` (a push that came
        between the store's claim and its wait)."""
        with self._changed:
            if (self.epoch, self._counts[queue]) != seen:
                ring(bell)

    def close_bell(self, queue: str, bell: tuple[int, int]) -> None:
        with self._changed, suppress(ValueError):
            self._bells[queue].remove(bell)
        for fd in bell:
            with suppress(OSError):
                os.close(fd)

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
                bells = [bell for queue_bells in self._bells.values() for bell in queue_bells]
            else:
                self._counts[queue] += 1
                bells = self._bells.get(queue, [])
            for bell in bells:
                ring(bell)
            self._changed.notify_all()

    def close(self) -> None:
        """Stop the thread; it closes its connection within ``_POLL_SECONDS``."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            with suppress(RuntimeError):
                thread.join(timeout=2 * _POLL_SECONDS)


def ring(bell: tuple[int, int]) -> None:
    """One byte into the doorbell; a full pipe is already ringing."""
    with suppress(BlockingIOError, OSError):
        os.write(bell[1], b"\0")


def hush(bell: tuple[int, int]) -> None:
    """Empty the doorbell, so that the next wait on it waits for a new ring."""
    with suppress(BlockingIOError, OSError):
        while os.read(bell[0], 4096):
            pass
