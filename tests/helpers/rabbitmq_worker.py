"""A real TaskWorker on the RabbitMQ backend, for ``test_rabbitmq.py``.

Run as ``python rabbitmq_worker.py --url URL --queue NAME --sleep SECONDS --jobs N``: one
pipeline whose only step sleeps ``--sleep`` seconds (in the worker's child process, as any
step runs), ``max_jobs`` N. Prints ``READY <connection name>`` once connected and
``RECONNECTS <n>`` (connections re-established after a loss) when the worker has stopped.
"""

from __future__ import annotations

import argparse
import sys
import time

from loguru import logger

from conveyor import Pipeline, PipelineService, QueueManager, StepContext, TaskWorker
from conveyor.worker import WorkerOptions

slow = Pipeline("slow", timeout=600)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--sleep", type=float, required=True)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()

    @slow.step
    def sleep(ctx: StepContext) -> float:
        time.sleep(args.sleep)
        return args.sleep

    logger.remove()
    logger.add(sys.stderr, level="INFO")
    queue = QueueManager.from_url(args.url, queue_name=args.queue)
    link = queue.server.link  # type: ignore[attr-defined]  # the RabbitMQ backend's
    worker = TaskWorker(
        queue, PipelineService([slow]), max_shutdown_wait=5,
        options=WorkerOptions(max_jobs=args.jobs, heartbeat_interval=1),
    )  # fmt: skip
    print(f"READY {link.name}", flush=True)
    worker.start()
    print(f"RECONNECTS {link.reconnects}", flush=True)
    queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
