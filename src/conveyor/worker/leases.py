"""Renewing the leases of running tasks, and bringing them their cancel requests.

One backend call per queue for all of its running tasks, every renewal period (at most a
second, so a cancel reaches a running task within about a second): the call reads each
task's cancel flag, and extends the leases too when the oldest renewal is due
(``WorkerOptions.renew_interval``: three times per visibility window). A lease found lost
is said once per task (after an outage, every later renewal would say it again).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..manager import QueueManager
from ..models import Message
from .options import WorkerOptions
from .slots import Slot

if TYPE_CHECKING:
    from loguru import Logger


def renew_running(
    queues: Sequence[QueueManager], slots: Sequence[Slot], options: WorkerOptions, now: float,
    log: Callable[[Message], Logger],
) -> None:  # fmt: skip
    """Renew (or just look at) the running tasks of each queue; raise cancel flags."""
    for queue in queues:
        running = [s for s in slots if s.task is not None and s.task.queue is queue]
        tasks = [s.task for s in running if s.task is not None]
        if not tasks:
            continue
        interval = options.renew_interval(queue.visibility_timeout)
        extend = any(now - task.renewed >= interval for task in tasks)
        states = queue.renew([task.message for task in tasks], extend)
        for slot, task, state in zip(running, tasks, states, strict=True):
            if extend:
                task.renewed = now
            if not state.held and not task.lease_lost and not slot.settling_itself(task):
                task.lease_lost = True
                log(task.message).warning("lease lost: another worker may run it")
            if state.cancel_requested:
                slot.cancel_flag.value = task.run
