"""Do claims block each other? N processes drain one queue at once; print each one's share.

A measurement: on a backend whose claims serialise behind one lock (SQLite's write lock,
taken by whichever process gets there first), one process can take nearly everything; on
PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets every process claim at once. Usage::

    python scripts/claim_split.py --url postgresql://postgres@127.0.0.1/postgres
    python scripts/claim_split.py --url sqlite:////tmp/split.db --tasks 2000 --json

Every process opens its manager, waits at a barrier, then reserves and acks until the
queue is empty (``ack_and_reserve``: one round trip per task). The queue is cleared after.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
import uuid
from typing import Any

from conveyor import QueueManager


def drain(url: str, queue_name: str, barrier: Any, results: Any) -> None:
    queue = QueueManager.from_url(url, queue_name=queue_name)
    taken = 0
    try:
        barrier.wait(timeout=120)
        message = queue.reserve(timeout=0)
        while message is not None:
            taken += 1
            _, message = queue.ack_and_reserve(message)
    finally:
        results.put(taken)
        queue.close()


def run(url: str, tasks: int, processes: int) -> dict[str, Any]:
    queue_name = f"split-{uuid.uuid4().hex[:8]}"
    producer = QueueManager.from_url(url, queue_name=queue_name)
    try:
        for start in range(0, tasks, 1000):
            batch = range(start, min(tasks, start + 1000))
            producer.push_many([(f"t{i}", {"n": i}, i % 3) for i in batch])
        context = multiprocessing.get_context("spawn")
        barrier, results = context.Barrier(processes + 1), context.Queue()
        workers = [
            context.Process(target=drain, args=(url, queue_name, barrier, results))
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        barrier.wait(timeout=120)
        started = time.perf_counter()
        split = sorted((results.get(timeout=600) for _ in workers), reverse=True)
        seconds = time.perf_counter() - started
        for worker in workers:
            worker.join(timeout=30)
        done = producer.stats().counts["success"]
    finally:
        producer.clear()
        producer.close()
    return {"tasks": tasks, "processes": processes, "split": split, "succeeded": done,
            "seconds": round(seconds, 2), "per_second": round(tasks / seconds)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    found = run(args.url, args.tasks, args.processes)
    if args.json:
        print(json.dumps(found))
        return
    print(
        f"{found['tasks']} tasks, {found['processes']} processes: split "
        f"{'/'.join(map(str, found['split']))} in {found['seconds']}s "
        f"({found['per_second']}/s); {found['succeeded']} succeeded"
    )


if __name__ == "__main__":
    main()
