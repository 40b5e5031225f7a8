"""Benchmark: 4 queues drained by 4 worker processes, on one Redis and on a Redis Cluster.

A measurement, not a test: it asserts nothing about speed. It starts its own servers on
free loopback ports with the test helpers (``tests/helpers``): one ``redis-server`` and a
cluster of 3 masters with one replica each, every node with ``appendonly yes`` and
``appendfsync everysec`` (what production runs), and stops them at the end. Each worker
process (``scripts/bench_worker.py serve``: no-op tasks, logging at WARNING) serves one
queue at concurrency 1. Throughput is all tasks over the span from the first start to the
last finish, read from the task records. One Redis with a replica is measured too, as
the fair match for a cluster whose masters each feed a replica. Usage::

    python scripts/bench_cluster.py [--n 5000] [--rounds 3]

``--n`` is tasks per queue. It also measures the cluster with ``durability=replicas=1``
(every push and ack waits for a replica). On a 2-core machine the 4 workers, the 6 cluster
nodes and this script share the cores, so the cluster cannot be faster there; the point is
that it is not slower.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

from bench_worker import _spawn  # noqa: E402
from conveyor import QueueManager  # noqa: E402
from helpers.private_cluster import PrivateCluster  # noqa: E402
from helpers.private_redis import PrivateRedis  # noqa: E402

QUEUES = 4


def drain(url: str, n: int) -> tuple[float, list[str]]:
    """Tasks/s of 4 worker processes draining 4 queues of ``n`` no-op tasks each."""
    names = [f"bc{i}-{uuid.uuid4().hex[:6]}" for i in range(QUEUES)]
    managers = [QueueManager.from_url(url, queue_name=name) for name in names]
    try:
        for queue in managers:
            for start in range(0, n, 1000):
                batch = [(f"d{i}", {}, i % 11) for i in range(start, min(n, start + 1000))]
                queue.push_many(batch)
        workers = [_spawn(url, name, 1, n) for name in names]
        for proc in workers:
            proc.wait(600)
        starts, ends = [], []
        for queue in managers:
            records = queue.list_tasks(status="success", limit=n)
            if len(records) != n:
                raise RuntimeError(f"{queue.queue_name}: {len(records)} of {n} succeeded")
            starts.append(min(r.started_at for r in records if r.started_at))
            ends.append(max(r.finished_at for r in records if r.finished_at))
        seconds = (max(ends) - min(starts)).total_seconds()
        return QUEUES * n / seconds, names
    finally:
        for queue in managers:
            queue.clear()
            queue.close()


def pushes(url: str, n: int) -> float:
    """Single pushes per second from one client (each waits for its reply, and with
    durability for its replica)."""
    name = f"bp-{uuid.uuid4().hex[:6]}"
    with QueueManager.from_url(url, queue_name=name) as queue:
        started = time.perf_counter()
        for i in range(n):
            queue.push(f"p{i}", {}, 5)
        rate = n / (time.perf_counter() - started)
        queue.clear()
    return rate


def placement(cluster: PrivateCluster, names: list[str]) -> str:
    ports = [cluster.port_of_key(f"conveyor:{{{name}}}:pending") for name in names]
    return ", ".join(f"{name}->{port}" for name, port in zip(names, ports, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=5000, help="tasks per queue")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-bench-cluster-"))
    single = PrivateRedis(workdir / "single", aof=True)
    primary = PrivateRedis(workdir / "primary", aof=True)
    replica = PrivateRedis(
        workdir / "replica", "--replicaof", "127.0.0.1", str(primary.port), aof=True
    )
    cluster = PrivateCluster(workdir / "cluster")
    try:
        cluster.start()
        targets = {
            "one Redis": single.url,
            "one Redis + 1 replica": primary.url,
            "one Redis + 1 replica, durability": f"{primary.url}?durability=replicas=1",
            "Redis Cluster (3 masters + 3 replicas)": cluster.url,
            "Redis Cluster, durability=replicas=1": f"{cluster.url}?durability=replicas=1",
        }
        results: dict[str, list[float]] = {label: [] for label in targets}
        singles: dict[str, list[float]] = {label: [] for label in targets}
        for round_ in range(args.rounds):
            for label, url in targets.items():  # interleaved: a slow moment hits all alike
                rate, names = drain(url, args.n)
                results[label].append(rate)
                singles[label].append(pushes(url, 2000))
                where = f"  [{placement(cluster, names)}]" if "cluster" in url else ""
                print(f"round {round_ + 1}: {label:<40} {rate:8.0f} tasks/s drained, "
                      f"{singles[label][-1]:6.0f} single pushes/s{where}", flush=True)  # fmt: skip
        print(f"\nmedian of {args.rounds} rounds: drain = {QUEUES} queues x {args.n} no-op "
              f"tasks by {QUEUES} worker processes; push = one client, one at a time")  # fmt: skip
        for label, rates in results.items():
            print(f"  {label:<40} drain {statistics.median(rates):6.0f} tasks/s "
                  f"(min {min(rates):.0f}, max {max(rates):.0f}); push "
                  f"{statistics.median(singles[label]):6.0f}/s")  # fmt: skip
    finally:
        cluster.stop()
        for server in (single, replica, primary):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"({time.monotonic() - started:.0f} s)")
    sys.exit(code)
