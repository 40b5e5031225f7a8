"""Benchmark one backend: throughput of the queue primitives and wake-up latency.

A measurement, not a test: it asserts nothing about speed. Usage::

    python scripts/bench.py                                  # SQLite in a temp dir
    python scripts/bench.py --url redis://127.0.0.1:6379/0 --n 20000 --json

It uses a fresh queue (``bench-<random>``) and clears it at the end. An ``amqp://`` URL
without ``task_store=`` gets a temporary SQLite task store (pass
``?task_store=redis://...`` to measure RabbitMQ over a Redis store). Throughputs are for
one client in one thread. Wake-up latency is from just before ``push()`` to the return of
a ``reserve(timeout=5)`` that was already blocked, measured with ``time.perf_counter`` in
one process (the consumer is a thread with its own manager: managers are not
thread-safe). Note that a same-process consumer may be woken by an in-process signal the
backend offers; a consumer in another process can see a longer latency.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue as queue_module
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conveyor import BrokerUnavailableError, ConfigError, QueueManager
from conveyor.urls import mask_url

Row = tuple[str, str, float, str]  # key (for --json), metric, value, unit


def payload(i: int) -> dict[str, Any]:
    """A small, realistic task body (a meeting-transcription job's shape)."""
    return {"audio_files": [f"meeting-{i}.wav"], "meeting_type": "weekly_sync"}


def tasks(n: int, prefix: str) -> list[tuple[str, dict[str, Any], int]]:
    """``n`` tasks over every priority 0..10, so the priority index does real work."""
    return [(f"{prefix}-{i}", payload(i), i % 11) for i in range(n)]


def rate(n: int, run: Callable[[], None]) -> float:
    """Tasks per second for ``run`` doing ``n`` tasks."""
    started = time.perf_counter()
    run()
    return n / (time.perf_counter() - started)


def fill(queue: QueueManager, n: int, batch: int, prefix: str) -> None:
    """Untimed setup: an empty queue holding ``n`` pending tasks."""
    queue.clear()
    items = tasks(n, prefix)
    for start in range(0, n, batch):
        queue.push_many(items[start : start + batch])


def bench_push_one(queue: QueueManager, n: int) -> float:
    queue.clear()
    items = tasks(n, "one")

    def run() -> None:
        for task_id, data, priority in items:
            queue.push(task_id, data, priority)

    return rate(n, run)


def bench_push_many(queue: QueueManager, n: int, batch: int) -> float:
    queue.clear()
    items = tasks(n, "many")

    def run() -> None:
        for start in range(0, n, batch):
            queue.push_many(items[start : start + batch])

    return rate(n, run)


def bench_reserve_ack(queue: QueueManager, n: int, batch: int) -> float:
    fill(queue, n, batch, "ra")

    def run() -> None:
        for done in range(n):
            message = queue.reserve(timeout=0)
            if message is None:
                raise RuntimeError(f"reserve+ack: queue ran dry after {done} of {n} tasks")
            queue.ack(message)

    return rate(n, run)


def bench_ack_and_reserve(queue: QueueManager, n: int, batch: int) -> float:
    fill(queue, n, batch, "aar")

    def run() -> None:
        message, done = queue.reserve(timeout=0), 0
        while message is not None:
            _, message = queue.ack_and_reserve(message)
            done += 1
        if done != n:
            raise RuntimeError(f"ack_and_reserve: settled {done} of {n} tasks")

    return rate(n, run)


def bench_pull(queue: QueueManager, n: int, batch: int) -> float:
    fill(queue, n, batch, "pull")

    def run() -> None:
        for done in range(n):
            if queue.pull(timeout=0) is None:
                raise RuntimeError(f"pull: queue ran dry after {done} of {n} tasks")

    return rate(n, run)


def bench_wakeup(url: str, queue_name: str, samples: int) -> list[float]:
    """Latencies in seconds of a blocked ``reserve`` woken by a ``push`` from another thread."""
    ready = threading.Event()
    returned: queue_module.Queue[float | BaseException] = queue_module.Queue()

    def consume() -> None:
        try:
            with QueueManager.from_url(url, queue_name=queue_name) as consumer:
                for _ in range(samples):
                    ready.set()
                    message = consumer.reserve(timeout=5)
                    at = time.perf_counter()
                    if message is None:
                        raise RuntimeError("wake-up: a blocked reserve saw no task within 5s")
                    consumer.ack(message)
                    returned.put(at)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            returned.put(exc)

    latencies: list[float] = []
    with QueueManager.from_url(url, queue_name=queue_name) as producer:
        producer.clear()
        thread = threading.Thread(target=consume, name="bench-consumer", daemon=True)
        thread.start()
        for i in range(samples):
            if not ready.wait(10):
                raise RuntimeError("wake-up: the consumer thread never got ready")
            ready.clear()
            # Let it settle into its blocking wait; the jitter keeps the samples from
            # locking onto the phase of a backend that polls.
            time.sleep(random.uniform(0.02, 0.06))
            pushed = time.perf_counter()
            producer.push(f"wake-{i}", {"i": i}, 5)
            got = returned.get(timeout=15)
            if isinstance(got, BaseException):
                raise got
            latencies.append(got - pushed)
        thread.join(timeout=10)
    return latencies


def percentile(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def run_all(url: str, n: int, batch: int, samples: int) -> list[Row]:
    """Every measurement in turn on a fresh queue, which is cleared at the end."""
    queue_name = f"bench-{uuid.uuid4().hex[:8]}"
    throughputs: list[tuple[str, str, Callable[[QueueManager], float]]] = [
        ("push", "push (one at a time)", lambda q: bench_push_one(q, n)),
        ("push_many", f"push_many (batches of {batch})", lambda q: bench_push_many(q, n, batch)),
        ("reserve_ack", "reserve + ack (two calls)", lambda q: bench_reserve_ack(q, n, batch)),
        (
            "ack_and_reserve",
            "ack_and_reserve (one call)",
            lambda q: bench_ack_and_reserve(q, n, batch),
        ),
        ("pull", "pull", lambda q: bench_pull(q, n, batch)),
    ]
    with QueueManager.from_url(url, queue_name=queue_name) as queue:
        queue.ping()
        try:
            rows = [(key, label, measure(queue), "tasks/s") for key, label, measure in throughputs]
            latencies = [s * 1000 for s in bench_wakeup(url, queue_name, samples)]
        finally:
            queue.clear()
    for pct in (50, 99):
        label = f"wake-up latency p{pct} ({samples} samples)"
        rows.append((f"wakeup_p{pct}", label, percentile(latencies, pct), "ms"))
    return rows


def table(rows: list[Row]) -> str:
    width = max(len(metric) for _, metric, _, _ in rows)
    lines = [f"{'metric':<{width}}  {'value':>10}  unit"]
    lines += [
        f"{metric:<{width}}  {value:>10.{2 if unit == 'ms' else 0}f}  {unit}"
        for _, metric, value, unit in rows
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", help="backend URL (default: SQLite in a temporary directory)")
    parser.add_argument("--n", type=int, default=10_000, help="tasks per throughput run")
    parser.add_argument("--batch", type=int, default=1000, help="push_many batch size")
    parser.add_argument("--samples", type=int, default=200, help="wake-up latency samples")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print results as JSON on stdout (the table goes to stderr)",
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch < 1 or args.samples < 2:
        parser.error("--n and --batch must be >= 1, --samples >= 2")
    return args


def with_task_store(url: str, workdir: Path) -> str:
    """RabbitMQ keeps no task state: an amqp:// URL without ``task_store`` gets a temporary
    SQLite task store here (instead of ``conveyor-rabbitmq.db`` in the working directory)."""
    if url.startswith(("amqp://", "amqps://")) and "task_store=" not in url:
        return f"{url}{'&' if '?' in url else '?'}task_store=sqlite:///{workdir}/tasks.db"
    return url


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    url = with_task_store(args.url, workdir) if args.url else f"sqlite:///{workdir}/bench.db"
    try:
        rows = run_all(url, args.n, args.batch, args.samples)
    except (BrokerUnavailableError, ConfigError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = sys.stderr if args.json else sys.stdout
    print(
        f"conveyor bench: {mask_url(url)}  n={args.n} batch={args.batch}  "
        f"python {platform.python_version()} on {platform.platform()}",
        file=out,
    )
    print(table(rows), file=out)
    if args.json:
        results = {
            "url": mask_url(url),
            "n": args.n,
            "batch": args.batch,
            "samples": args.samples,
            "results": {
                key: {"metric": metric, "value": value, "unit": unit}
                for key, metric, value, unit in rows
            },
        }
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
