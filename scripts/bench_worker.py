"""End-to-end worker benchmarks: drain throughput, push-to-start latency, memory, inversion.

Run through ``scripts/bench.py --worker`` (or directly: ``python scripts/bench_worker.py
--url redis://...``). The worker runs as a real subprocess (``serve`` mode below), with
no-op tasks and logging at WARNING so the numbers measure the queue and the child-process
hand-off, not log formatting.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from conveyor import Pipeline, PipelineService, QueueManager, StepContext, TaskWorker
from conveyor.worker import WorkerOptions

bench = Pipeline("bench")


@bench.step
def stamp(ctx: StepContext) -> float:
    """A no-op that returns when it started, for push-to-start latency."""
    return time.time()


Row = tuple[str, str, float, str]


def serve(url: str, queue_name: str, concurrency: int, max_jobs: int, pool: str) -> None:
    """Subprocess mode: run a worker until ``max_jobs`` tasks are done."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    queue = QueueManager.from_url(url, queue_name=queue_name)
    worker = TaskWorker(
        queue, PipelineService([bench]), max_shutdown_wait=5, concurrency=concurrency,
        options=WorkerOptions(max_jobs=max_jobs, heartbeat_interval=2, pool=pool),  # type: ignore[arg-type]
    )  # fmt: skip
    print("ready", flush=True)
    worker.start()


def _spawn(
    url: str, queue_name: str, concurrency: int, max_jobs: int, pool: str = "process"
) -> subprocess.Popen[str]:
    command = [
        sys.executable, __file__, "serve", url, queue_name, str(concurrency), str(max_jobs), pool
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the bench worker did not start")
    return proc


def _memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB of a process and its children (Linux /proc).

    RSS counts the pages a forked child shares with its parent twice; PSS splits shared
    pages between the processes sharing them, so it is what the worker adds to the host.
    """
    rss = pss = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for each in pids:
        for line in Path(f"/proc/{each}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss / 1024, pss / 1024


def drain(url: str, n: int, concurrency: int, pool: str) -> tuple[float, float, float, float]:
    """No-op tasks per second through one worker process; also its peak RSS and PSS (MB),
    and the CPU time the worker and its children spent per task (ms, start-up included):
    on a loaded host the rate drifts with the load, the CPU time much less."""
    name = f"bw-{uuid.uuid4().hex[:8]}"
    with QueueManager.from_url(url, queue_name=name) as queue:
        for start in range(0, n, 1000):
            queue.push_many([(f"d{i}", {}, i % 11) for i in range(start, min(n, start + 1000))])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = _spawn(url, name, concurrency, n, pool)
        rss = pss = 0.0
        while proc.poll() is None:
            try:
                now_rss, now_pss = _memory_mb(proc.pid)
            except (OSError, ValueError):
                break  # it exited between poll() and the read
            rss, pss = max(rss, now_rss), max(pss, now_pss)
            time.sleep(0.2)
        proc.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        records = queue.list_tasks(status="success", limit=n)
        started = min(r.started_at for r in records if r.started_at)
        finished = max(r.finished_at for r in records if r.finished_at)
        queue.clear()
    if len(records) != n:
        raise RuntimeError(f"drain: {len(records)} of {n} tasks succeeded")
    return n / (finished - started).total_seconds(), rss, pss, cpu * 1000 / n


def push_to_start(url: str, samples: int) -> list[float]:
    """Seconds from push() to the step starting, on an idle worker."""
    name = f"bl-{uuid.uuid4().hex[:8]}"
    latencies: list[float] = []
    with QueueManager.from_url(url, queue_name=name) as queue:
        proc = _spawn(url, name, 1, samples)
        for i in range(samples):
            time.sleep(0.02)  # let the worker settle into its blocking reserve
            pushed = time.time()
            queue.push(f"l{i}", {}, 5)
            deadline = time.monotonic() + 10
            while True:
                record = queue.get_task(f"l{i}")
                if record is not None and record.result is not None:
                    latencies.append(float(record.result) - pushed)
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("push-to-start: a task was not run within 10 s")
                time.sleep(0.002)
        proc.wait(30)
        queue.clear()
    return latencies


def inversion(url: str, backlog: int) -> bool:
    """A priority-10 task pushed behind ``backlog`` priority-0 tasks is the next one started."""
    name = f"bi-{uuid.uuid4().hex[:8]}"
    with QueueManager.from_url(url, queue_name=name) as queue:
        for start in range(0, backlog, 1000):
            queue.push_many([(f"b{i}", {}, 0) for i in range(start, min(backlog, start + 1000))])
        queue.push("urgent", {}, 10)
        proc = _spawn(url, name, 1, 1)
        proc.wait(60)
        first = queue.list_tasks(status="success", limit=1)
        queue.clear()
    return bool(first) and first[0].id == "urgent"


def run_worker_bench(url: str, n: int, samples: int, pools: list[str]) -> list[Row]:
    rows: list[Row] = []
    for pool in pools:
        for concurrency in (1, 2):
            rate, rss, pss, cpu = drain(url, n, concurrency, pool)
            tag, what = f"{pool[0]}c{concurrency}", f"{pool} pool, concurrency {concurrency}"
            rows.append((f"drain_{tag}", f"worker drain, {what}", rate, "tasks/s"))
            rows.append((f"cpu_{tag}", f"worker + children CPU per task, {what}", cpu, "ms"))
            rows.append((f"rss_{tag}", f"worker + children RSS, {what}", rss, "MB"))
            rows.append((f"pss_{tag}", f"worker + children PSS, {what}", pss, "MB"))
    latencies = [s * 1000 for s in push_to_start(url, samples)]
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    rows.append(("start_p50", f"push-to-start p50 ({samples} samples)", quantiles[49], "ms"))
    rows.append(("start_p99", f"push-to-start p99 ({samples} samples)", quantiles[98], "ms"))
    ok = inversion(url, 10_000)
    rows.append(("inversion", "priority 10 behind 10,000 x priority 0 starts first", ok, "yes=1"))
    return rows


def main(argv: list[str]) -> int:
    if argv and argv[0] == "serve":
        serve(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument(
        "--pool", choices=["process", "thread", "both"], default="both",
        help="worker.pool to measure the drain with (default: both)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-bench-worker-"))
    try:
        url = with_task_store(args.url, workdir)
        pools = ["process", "thread"] if args.pool == "both" else [args.pool]
        for key, metric, value, unit in run_worker_bench(url, args.n, args.samples, pools):
            print(f"{metric:<55} {value:>10.2f} {unit}  ({key})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def with_task_store(url: str, workdir: Path) -> str:
    """RabbitMQ keeps no task state: an amqp:// URL without ``task_store`` gets a temporary
    SQLite task store, shared with the worker subprocess through the URL."""
    if url.startswith(("amqp://", "amqps://")) and "task_store=" not in url:
        return f"{url}{'&' if '?' in url else '?'}task_store=sqlite:///{workdir}/tasks.db"
    return url


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
