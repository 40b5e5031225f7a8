"""Sweeps and heartbeats on a thread of their own, off the path of a waiting task.

The loop used to sweep (timeouts, lost leases, retention) and heartbeat in its own turns:
two more round trips, 5-10 ms together on a quiet host and several times that on a busy
one, during which a task pushed to an idle worker waited. Measured on an idle Redis
worker, they were its worst push-to-start delays. Here they run on a daemon thread that
spends its time waiting on the network or on its timer, so the loop goes on claiming.

Only where the backend's client may be shared by threads: Redis (redis-py's pooled client;
sweep and register keep no state in the queue manager). SQLite and RabbitMQ keep the
upkeep in the loop. The loop still watches the recycling limits at the heartbeat's pace,
and it alone decides about outages: a failed sweep or heartbeat here is retried at the
next period (an outage also pauses them, as in the loop, because the calls fail).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from loguru import logger

from ..backends import QueueBackend
from ..errors import ConveyorError
from ..manager import QueueManager


def can_share(queues: Sequence[QueueManager]) -> bool:
    """True when sweeps and heartbeats may run on another thread (see the module's doc)."""
    return all(queue.backend_kind is QueueBackend.REDIS for queue in queues)


class Upkeep:
    """Every ``sweep_interval``, sweep each queue (unless ``sweeping()`` is False); every
    ``heartbeat_interval``, call ``heartbeat``. The first of both runs at once."""

    def __init__(
        self, queues: Sequence[QueueManager], heartbeat: Callable[[], None],
        sweeping: Callable[[], bool], *, heartbeat_interval: float, sweep_interval: float,
    ) -> None:  # fmt: skip
        self._queues = list(queues)
        self._heartbeat = heartbeat
        self._sweeping = sweeping
        self._intervals = (heartbeat_interval, sweep_interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conveyor-upkeep", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop and wait for a call in flight (so no heartbeat follows the unregister)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        beat_every, sweep_every = self._intervals
        next_beat = next_sweep = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + beat_every
                self._guarded("heartbeat", self._heartbeat)
            if now >= next_sweep and self._sweeping():
                next_sweep = now + sweep_every
                for queue in self._queues:
                    self._guarded(f"sweep of {queue.queue_name}", queue.sweep)
            self._stop.wait(max(0.0, min(next_beat, next_sweep) - time.monotonic()))

    def _guarded(self, what: str, call: Callable[[], None]) -> None:
        if self._stop.is_set():
            return
        try:
            call()
        except ConveyorError as exc:  # an outage included: the loop reports those
            logger.debug("{} failed: {}; tried again next time", what, exc)
        except Exception:  # a bug must not end the heartbeats silently
            logger.exception("{} failed; tried again next time", what)
