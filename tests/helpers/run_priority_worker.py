"""Run a real ``TaskWorker`` on ``priority_pipelines`` with preemption and reserved slots.

``python run_priority_worker.py --url URL --queue NAME [--concurrency N]
[--preempt-margin M] [--preempt-after S] [--max-preemptions K] [--reserve P:SLOTS]
[--aging-interval S]`` prints ``ready`` and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: helpers.*

from conveyor import PipelineService, QueueManager, TaskWorker, WorkerOptions
from conveyor.logs import configure_logging
from conveyor.settings import LoggingSettings
from conveyor.worker.preemption import PreemptPolicy
from conveyor.worker.reserve import Reserve


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--preempt-margin", type=int)
    parser.add_argument("--preempt-after", type=float, default=0.0)
    parser.add_argument("--max-preemptions", type=int, default=3)
    parser.add_argument("--reserve", help="PRIORITY:SLOTS")
    parser.add_argument("--aging-interval", type=float)
    args = parser.parse_args()

    configure_logging(LoggingSettings(level="INFO"))
    queue = QueueManager.from_url(
        args.url, queue_name=args.queue, visibility_timeout=30.0,
        aging_interval=args.aging_interval,
    )  # fmt: skip
    service = PipelineService.from_import_paths(["helpers.priority_pipelines"])
    reserve = None
    if args.reserve:
        priority, slots = args.reserve.split(":")
        reserve = Reserve(int(priority), int(slots))
    preemption = None
    if args.preempt_margin is not None:
        preemption = PreemptPolicy(args.preempt_margin, args.preempt_after, args.max_preemptions)
    options = WorkerOptions(
        heartbeat_interval=1.0, idle_block=0.2, preemption=preemption, reserve=reserve
    )
    worker = TaskWorker(queue, service, 10.0, concurrency=args.concurrency, options=options)
    print("ready", flush=True)
    worker.start()
    print(f"stopped {worker.stop_reason} preempted={worker.preempted}", flush=True)
    queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
