"""Sweeps and heartbeats on their own thread (Redis): they keep coming, survive a failing
call, and stop for good when asked (no heartbeat after the worker unregisters)."""

from __future__ import annotations

import threading

import pytest

from conftest import wait_until
from conveyor import QueueManager
from conveyor.errors import BrokerUnavailableError
from conveyor.worker.upkeep import Upkeep, can_share


@pytest.mark.parametrize("backend_name", ["redis"])
def test_heartbeats_and_sweeps_go_on_past_failures_and_stop_for_good(
    queue: QueueManager,
) -> None:
    beats: list[int] = []
    sweeps: list[int] = []
    lock = threading.Lock()

    def heartbeat() -> None:
        with lock:
            beats.append(1)
        if len(beats) == 2:
            raise BrokerUnavailableError("a blip")  # logged; the next beat comes anyway

    original = queue.sweep

    def sweep() -> None:
        original()
        sweeps.append(1)

    queue.sweep = sweep  # type: ignore[method-assign]
    upkeep = Upkeep([queue], heartbeat, lambda: True, heartbeat_interval=0.02, sweep_interval=0.05)
    upkeep.start()
    wait_until(lambda: len(beats) >= 5 and len(sweeps) >= 2, 10, message="beats and sweeps")
    upkeep.stop()
    seen = len(beats)
    done = threading.Event()
    done.wait(0.1)  # nothing else to poll: a stopped thread must stay quiet
    assert len(beats) == seen, "a heartbeat after stop()"
    assert can_share([queue])


@pytest.mark.parametrize("backend_name", ["sqlite"])
def test_sqlite_keeps_its_upkeep_in_the_loop(queue: QueueManager) -> None:
    assert not can_share([queue])
