"""The scheduler: pushes each schedule's ticks, exactly once however many schedulers run.

Any number of schedulers (one in every worker, on any host) may run the same schedules.
Each tick has a deterministic task id (``cron:<name>:<epoch>``), and it is pushed with
``push_once``: in one atomic step the store refuses it while any record of that id exists,
finished ones included. The tick's record *is* its claim, kept as long as finished records
are (``queue.result_ttl``, days by default; far longer than the seconds a late scheduler
could still try the tick). So each tick is pushed once, whichever scheduler gets there.

Every scheduler also writes its schedules' definitions and next runs to the backend's
schedules registry, and the latest tick pushed (``advance_schedule``), which is what every
scheduler counts missed ticks from: ticks older than the schedule's ``grace`` were missed
while no scheduler ran, and its ``missed`` policy says what happens to them.

The clock is injectable (``clock``) so tests can step through hundreds of ticks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loguru import logger

from ..errors import ConveyorError
from ..manager import QueueManager
from .definition import Schedule

#: Ticks pushed per schedule per pass at most (a per-second schedule after a long pause
#: counts the rest as missed).
MAX_TICKS_PER_PASS = 100
#: How often a scheduler writes its definitions again (seen_at: it still runs them).
REFRESH_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Pushed:
    """A tick this scheduler pushed (``missed``: the one run for missed ticks)."""

    schedule: str
    tick: float
    task_id: str
    missed: bool = False


class Scheduler:
    """Pushes the due ticks of ``schedules``; ``run_pending()`` is one pass.

    ``queue_for(name)`` gives the manager of a queue (the scheduler's own: managers are not
    thread-safe); the first queue's server holds the registry.
    """

    def __init__(
        self,
        schedules: Sequence[Schedule],
        queue_for: Callable[[str], QueueManager],
        *,
        writer: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        names = [schedule.name for schedule in schedules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConveyorError(f"schedules: two schedules named {duplicates[0]!r} here")
        self.schedules = list(schedules)
        self._queue_for = queue_for
        self.writer = writer
        self.clock = clock
        self.started_at = clock()
        self._noted: dict[str, tuple[float | None, float]] = {}  # name -> (next, written at)

    def _registry_queue(self) -> QueueManager:
        return self._queue_for(self.schedules[0].queue)

    def run_pending(self) -> list[Pushed]:
        """One pass: push every due tick; returns what this scheduler pushed."""
        if not self.schedules:
            return []
        now = self.clock()
        registry = self._registry_queue().server.registry
        last_ticks = {row["name"]: row["last_tick"] for row in registry.schedules()}
        pushed: list[Pushed] = []
        for schedule in self.schedules:
            try:
                pushed += self._run_one(schedule, now, _number(last_ticks.get(schedule.name)))
            except ConveyorError as exc:
                logger.warning("schedule {}: this pass failed: {}", schedule.name, exc)
        return pushed

    def seconds_to_next(self) -> float:
        """Seconds until the earliest next tick (to sleep that long, at most)."""
        now = self.clock()
        return max(0.0, min(s.next_after(now) for s in self.schedules) - now)

    def _run_one(self, schedule: Schedule, now: float, last: float | None) -> list[Pushed]:
        horizon = now - schedule.grace
        start = max(last, horizon) if last is not None else max(self.started_at - 1e-6, horizon)
        ticks: list[tuple[float, bool]] = []
        if last is not None and last < horizon and schedule.missed == "run_once":
            latest_missed = schedule.last_at_or_before(horizon)
            if latest_missed is not None and latest_missed > last:
                ticks.append((latest_missed, True))
        for tick in schedule.ticks_after(start):
            if tick > now or len(ticks) >= MAX_TICKS_PER_PASS:
                break
            ticks.append((tick, False))
        pushed = []
        queue = self._queue_for(schedule.queue)
        for tick, missed in ticks:
            task_id = schedule.task_id(tick)
            if queue.push_once(
                task_id, schedule.data, schedule.priority, type=schedule.type,
                **schedule.options,
            ):  # fmt: skip
                pushed.append(Pushed(schedule.name, tick, task_id, missed))
                logger.info("schedule {}: pushed {}{}", schedule.name, task_id,
                            " (for missed ticks)" if missed else "")  # fmt: skip
            queue.server.registry.advance_schedule(schedule.name, tick)
        self._note(schedule, now)
        return pushed

    def _note(self, schedule: Schedule, now: float) -> None:
        """Write the definition and next run when the next run changed, and now and then."""
        next_run = schedule.next_after(now)
        previous = self._noted.get(schedule.name)
        fresh = previous is not None and time.monotonic() - previous[1] < REFRESH_SECONDS
        if previous is not None and previous[0] == next_run and fresh:
            return
        registry = self._queue_for(schedule.queue).server.registry
        definition = json.dumps(schedule.definition(), sort_keys=True)
        registry.note_schedule(
            schedule.name, schedule.fingerprint(), definition, self.writer, next_run
        )
        self._noted[schedule.name] = (next_run, time.monotonic())


def _number(value: object) -> float | None:
    try:
        return None if value is None else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
