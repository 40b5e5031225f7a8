"""Reserved capacity: ``worker.reserve: {priority: 8, slots: 1}`` keeps slots for urgent work.

At most ``concurrency - slots`` tasks of declared priority below ``priority`` run at once; a
claim that would fill a reserved slot asks the store for ``min_priority`` (the head of the
line is taken only if it is urgent enough), so an urgent task starts at once on a worker
whose other slots are busy, with no preemption. Declared priority only: aging never lets a
task into a reserved slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reserve:
    priority: int
    slots: int

    def ordinary_room(self, concurrency: int, running: Iterable[int]) -> int:
        """How many more tasks below ``priority`` may start now (running: their priorities)."""
        ordinary = sum(1 for priority in running if priority < self.priority)
        return max(0, concurrency - self.slots - ordinary)


def claim_floor(reserve: Reserve | None, concurrency: int, running: Iterable[int]) -> int | None:
    """The ``min_priority`` of the next claim: None while an ordinary slot is free."""
    if reserve is None or reserve.ordinary_room(concurrency, running) > 0:
        return None
    return reserve.priority
