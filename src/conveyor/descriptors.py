"""Which of a set of file descriptors are ready: a worker's pipes, sentinels and doorbells.

``multiprocessing.connection.wait`` builds and tears down a selector, with a key object
per descriptor, on every call; the worker waits once per task, so that showed up among its
costs per task. One ``poll`` object per wait does the same for a fraction of it: any event
on a descriptor (data, hang-up, error) counts as ready, as it does for ``wait``.
"""

from __future__ import annotations

import select
from collections.abc import Iterable
from typing import Any


def ready(waitables: Iterable[Any], timeout: float) -> set[Any]:
    """The subset of ``waitables`` (file descriptors, or objects with ``fileno()``) that
    is ready within ``timeout`` seconds."""
    poller = select.poll()
    by_fd: dict[int, Any] = {}
    for item in waitables:
        fd = item if isinstance(item, int) else item.fileno()
        by_fd[fd] = item
        poller.register(fd, select.POLLIN)
    return {by_fd[fd] for fd, _ in poller.poll(max(timeout, 0.0) * 1000.0)}


def readable_now(item: Any) -> bool:
    """``Connection.poll()`` without its selector: is there something to read (or has the
    other end gone) right now?"""
    poller = select.poll()  # not select(): a descriptor may be numbered above 1023
    poller.register(item if isinstance(item, int) else item.fileno(), select.POLLIN)
    return bool(poller.poll(0))
