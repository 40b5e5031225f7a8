"""A scheduler process on a fake clock, for the exactly-once test.

    python run_scheduler.py URL QUEUE CLOCK_FILE OUT_FILE NAME

It runs the schedule ``tick-QUEUE`` (``* * * * * *``, UTC) with ``Scheduler`` and reads
"now" from CLOCK_FILE (the test steps it); it appends ``task_id tick`` to OUT_FILE for each
tick *it* pushed, and exits when CLOCK_FILE says ``stop``.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

from conveyor import QueueManager
from conveyor.schedules import Schedule, Scheduler


class LatePush:
    """A manager whose ``push_once`` starts up to 30 ms late: the scheduler's view of the
    last tick is then often stale by the time it pushes, and the test has finished the
    tick's task meanwhile; only an atomic claim of the tick keeps it from running twice."""

    def __init__(self, manager: QueueManager) -> None:
        self.manager = manager

    def __getattr__(self, name: str) -> Any:
        return getattr(self.manager, name)

    def push_once(self, *args: Any, **options: Any) -> bool:
        time.sleep(random.uniform(0, 0.03))
        return self.manager.push_once(*args, **options)


def main() -> None:
    url, queue_name, clock_file, out_file, name = sys.argv[1:6]
    managers: dict[str, Any] = {}

    def queue_for(queue: str) -> Any:
        if queue not in managers:
            managers[queue] = LatePush(QueueManager.from_url(url, queue_name=queue))
        return managers[queue]

    def read_clock() -> str:
        while True:
            with open(clock_file) as file:
                text = file.read().strip()
            if text:
                return text
            time.sleep(0.001)  # the test is writing it

    current = [float(read_clock())]
    schedule = Schedule(f"tick-{queue_name}", "* * * * * *", queue=queue_name, data={"n": 1},
                        grace=3600)  # fmt: skip
    scheduler = Scheduler([schedule], queue_for, writer=name, clock=lambda: current[0])
    print("ready", flush=True)
    while (text := read_clock()) != "stop":
        current[0] = float(text)
        for pushed in scheduler.run_pending():
            fd = os.open(out_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, f"{pushed.task_id} {pushed.tick:.0f} {name}\n".encode())
            os.close(fd)
        time.sleep(0.002)
    for manager in managers.values():
        manager.close()


if __name__ == "__main__":
    main()
