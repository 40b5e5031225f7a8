"""Step-boundary preemption: which running task yields, and when.

A preemptible pipeline's child pauses after each step until the worker says ``go`` or
``yield``. The check runs only then, and only when every slot is busy (a free slot takes
the urgent task anyway), so it costs nothing otherwise; it reads the head of the line once
(``QueueManager.head``: O(1) on every backend). The running preemptible task with the
lowest declared priority yields; a tie goes to the one whose step just ended, and a lower
one that is mid-step yields at its own next boundary instead. The ready task must exceed it
by ``margin`` and have waited longer than ``after`` seconds. The store's PREEMPT then yields
and claims in one step (see ``QueueStore.preempt``), so two workers never yield for one
urgent task, and ``max_preemptions`` keeps a task from thrashing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..backends import Head


@dataclass(frozen=True, slots=True)
class PreemptPolicy:
    margin: int
    after: float = 0.0
    max_preemptions: int = 3


def yield_floor(
    policy: PreemptPolicy,
    ended: int,
    others: Iterable[int],
    head: Head | None,
    now: float,
) -> int | None:
    """The ``min_priority`` to preempt the task whose step just ended (declared priority
    ``ended``; ``others``: the other running preemptible tasks' priorities), or None when
    it should go on: nothing urgent enough is ready, or another task ranks lower."""
    if head is None:
        return None
    if any(priority < ended for priority in others):
        return None  # the lowest yields, at its own step boundary
    floor = ended + policy.margin
    if head.priority < floor or now - head.ready_at <= policy.after:
        return None
    return floor
