"""A wake-up a worker can wait on beside its children's pipes.

A worker with a busy slot and a free one must notice both a child's reply and a push. A
blocking ``BLPOP`` would miss the reply, so it used to claim every 50 ms instead: up to
50 ms before a pushed task started, and twenty claims a second for nothing. The doorbell
sends ``BLPOP`` on the queue's wake list over a connection of its own and does not wait
for the answer: the worker selects on that socket with the pipes, and reads the answer
(a wake marker, or nil when the block timed out) once the socket is readable.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis

from ...descriptors import readable_now, ready
from .client import RedisClient

#: How long after its own timeout an outstanding BLPOP may go unanswered before the
#: connection is taken for dead (a paused master, or one replaced in a failover).
_ANSWER_GRACE = 1.0


class WakeBell:
    """One outstanding ``BLPOP`` at most, on a dedicated connection to the queue's master."""

    def __init__(self, client: RedisClient, route_key: str, wake_key: str) -> None:
        self._client = client
        self._route_key = route_key
        self._wake_key = wake_key
        self._conn: Any = None
        self._asked = False
        self._answer_by = 0.0  # when the server must have answered the outstanding BLPOP

    def arm(self, seconds: float) -> int | None:
        """The socket to wait on, with a ``BLPOP`` of up to ``seconds`` outstanding; None
        when the connection broke (the caller's next claim finds out why). A server that
        refuses a new connection raises ``BrokerUnavailableError``, as any call does: the
        worker then rides out the outage."""
        seconds = min(max(seconds, 0.01), self._client.max_block)
        if self._asked and time.monotonic() > self._answer_by:
            self.close()  # no answer in time: a paused or replaced master; ask again
        try:
            if self._conn is None:
                self._conn = self._client.dedicated_connection(self._route_key)
            if not self._asked:
                self._conn.send_command("BLPOP", self._wake_key, f"{seconds:.3f}")
                self._asked = True
                self._answer_by = time.monotonic() + seconds + _ANSWER_GRACE
            sock = self._conn._sock  # redis-py keeps the socket here while connected
            return None if sock is None else int(sock.fileno())
        except (redis.RedisError, OSError):
            self.close()
            return None

    @property
    def asked(self) -> bool:
        """A ``BLPOP`` is outstanding: it, not a new one, gets the next wake marker."""
        return self._asked

    def wait(self, seconds: float) -> None:
        """Block until the outstanding ``BLPOP`` answers, or ``seconds``."""
        fd = self.arm(seconds)
        if fd is not None and ready([fd], seconds):
            self.heard()

    def withdraw(self) -> None:
        """Take back an outstanding ``BLPOP`` (the worker will not wait for a while): Redis
        hands each marker to the client that blocked first, so a BLPOP nobody is waiting
        on would take the wake-up of a push from a worker that could run it. One that was
        answered already is read instead, and a marker it took is put back for the others
        (closing would throw it away, and another idle worker would sleep through a push)."""
        if not self._asked:
            return
        sock = None if self._conn is None else self._conn._sock
        if sock is None or not readable_now(sock):
            self.close()  # the server drops a blocked command of a closed connection
        elif self.heard() is not None and self._conn is not None:
            try:
                self._conn.send_command("RPUSH", self._wake_key, "1")
                self._conn.read_response()
            except (redis.RedisError, OSError):
                self.close()

    def heard(self) -> Any:
        """Read the answer that made the socket readable: a wake marker, or None (the block
        timed out, or the connection broke: it is dropped and made again at ``arm``)."""
        if self._conn is None or not self._asked:
            return None
        self._asked = False
        try:
            return self._conn.read_response()
        except (redis.RedisError, OSError):
            self.close()
            return None

    def close(self) -> None:
        conn, self._conn, self._asked = self._conn, None, False
        if conn is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                conn.disconnect()
