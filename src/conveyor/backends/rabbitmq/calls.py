"""Values that cross between the caller's thread and the link's I/O thread."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any


class LinkLostError(Exception):
    """A call was cut short by a lost connection or channel; the caller may retry it.

    Internal to the RabbitMQ backend: it never reaches a QueueManager user.
    """


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message the broker handed us, unacked until we settle it.

    ``epoch`` names the channel incarnation that carried it: delivery tags are per channel,
    so a tag from a channel that has since closed must never be acked on its successor
    (it would settle a different message). The broker already requeued such a delivery.
    """

    epoch: int
    tag: int
    redelivered: bool
    body: bytes
    queue: str = ""  # the broker queue it came from
    priority: int = 0  # the message's AMQP priority: the task's declared priority


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: persistent, with the task's priority as the AMQP property."""

    priority: int
    body: bytes


class Call:
    """A caller thread waiting for the I/O thread to finish one operation.

    ``resolve``/``fail`` return False when the caller already gave up (timed out), so the
    I/O thread can keep what it got (e.g. stash a delivery) instead of losing it.

    With ``ring``, finishing also writes a byte to that file descriptor (a pipe the caller
    waits on with others). The write happens under the call's lock, so once ``abandon``
    has returned no write can follow, and the caller may close the pipe.
    """

    __slots__ = ("_done", "_lock", "_ring", "abandoned", "error", "value")

    def __init__(self, ring: int | None = None) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._ring = ring
        self.abandoned = False
        self.value: Any = None
        self.error: BaseException | None = None

    def resolve(self, value: Any = None) -> bool:
        with self._lock:
            if self.abandoned or self._done.is_set():
                return False
            self.value = value
            self._finish()
            return True

    def fail(self, error: BaseException) -> bool:
        with self._lock:
            if self.abandoned or self._done.is_set():
                return False
            self.error = error
            self._finish()
            return True

    def _finish(self) -> None:
        self._done.set()
        if self._ring is not None:
            with contextlib.suppress(OSError):  # full: it rings already
                os.write(self._ring, b"\0")

    def settled(self) -> bool:
        """Done, and its ring written (taken under the lock the writer holds)."""
        with self._lock:
            return self._done.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True once done (the caller still owns the call)."""
        return self._done.wait(timeout)

    def abandon(self) -> bool:
        """Give up; False if the call finished meanwhile (its result is then valid)."""
        with self._lock:
            if self._done.is_set():
                return False
            self.abandoned = True
            return True

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value
