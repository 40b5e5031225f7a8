"""A scheduler process on a fake clock, for the exactly-once test.

    python run_scheduler.py URL QUEUE CLOCK_FILE OUT_FILE NAME

It runs the schedule ``every-second`` (``* * * * * *``, UTC) with ``Scheduler`` and reads
"now" from CLOCK_FILE (the test steps it); it appends ``task_id tick`` to OUT_FILE for each
tick *it* pushed, and exits when CLOCK_FILE says ``stop``.
"""

from __future__ import annotations

import os
import sys
import time

from conveyor import QueueManager
from conveyor.schedules import Schedule, Scheduler


def main() -> None:
    url, queue_name, clock_file, out_file, name = sys.argv[1:6]
    managers: dict[str, QueueManager] = {}

    def queue_for(queue: str) -> QueueManager:
        if queue not in managers:
            managers[queue] = QueueManager.from_url(url, queue_name=queue)
        return managers[queue]

    def read_clock() -> str:
        while True:
            with open(clock_file) as file:
                text = file.read().strip()
            if text:
                return text
            time.sleep(0.001)  # the test is writing it

    current = [float(read_clock())]
    schedule = Schedule("every-second", "* * * * * *", queue=queue_name, data={"n": 1},
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
