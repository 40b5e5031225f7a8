"""Run a real ``TaskWorker`` for ``tests/test_worker.py``.

``python run_worker.py --url URL --queue NAME[,NAME...] [options]`` builds one QueueManager
per queue, a PipelineService from ``--pipelines`` (default: every pipeline in
``helpers.pipelines``) and a TaskWorker with the options given, prints ``ready <worker id>``
and runs ``start()``. When ``start()`` returns it prints ``stopped <reason>`` and exits 0.

Signals are the real ones: the test sends SIGTERM/SIGINT/SIGKILL to this process.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: helpers.pipelines

from conveyor import PipelineService, QueueManager, RetryDefaults, TaskWorker, WorkerOptions
from conveyor.logs import configure_logging
from conveyor.settings import LoggingSettings
from conveyor.worker.reserve import Reserve


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True, help="one name, or several comma-separated")
    parser.add_argument("--pipelines", default="helpers.pipelines")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-shutdown-wait", type=float, default=10.0)
    parser.add_argument("--shutdown-mode", choices=["requeue", "fail"], default="requeue")
    parser.add_argument("--max-jobs", type=int)
    parser.add_argument("--max-time", type=float)
    parser.add_argument("--visibility-timeout", type=float, default=30.0)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--idle-block", type=float, default=0.5)
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--retry-backoff", type=float, default=0.1)
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--pool", choices=["process", "thread"], default="process")
    parser.add_argument("--reserve", help="PRIORITY:SLOTS, slots kept for urgent work")
    args = parser.parse_args()

    configure_logging(LoggingSettings(level="DEBUG"))
    queues = [
        QueueManager.from_url(args.url, queue_name=name, visibility_timeout=args.visibility_timeout)
        for name in args.queue.split(",")
    ]
    service = PipelineService.from_import_paths(args.pipelines.split(","))
    options = WorkerOptions(
        shutdown_mode=args.shutdown_mode,
        max_jobs=args.max_jobs,
        max_time=args.max_time,
        heartbeat_interval=args.heartbeat,
        idle_block=args.idle_block,
        pool=args.pool,
        reserve=None if args.reserve is None else Reserve(*map(int, args.reserve.split(":"))),
        retry=RetryDefaults(
            max_retries=args.max_retries, retry_backoff=args.retry_backoff, jitter=args.jitter
        ),
    )
    worker = TaskWorker(
        queues,
        service,
        max_shutdown_wait=args.max_shutdown_wait,
        concurrency=args.concurrency,
        options=options,
    )

    # Until start() installs its own handlers, a signal still means "stop gracefully", so a
    # test that signals right after "ready" sees the same exit as one that signals later.
    def early_stop(signum: int, frame: FrameType | None) -> None:
        worker.stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, early_stop)
    signal.signal(signal.SIGINT, early_stop)
    print(f"ready {worker.id}", flush=True)
    try:
        worker.start()
    finally:
        for queue in queues:
            queue.close()
    print(f"stopped {worker.stop_reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
