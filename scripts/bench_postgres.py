"""Benchmark the PostgreSQL backend against raw psycopg and against its peers, side by side.

A measurement, not a test. Usage::

    python scripts/bench_postgres.py --url postgresql://postgres@127.0.0.1:5432/postgres
    python scripts/bench_postgres.py --n 2000 --peers /path/to/venv/bin/python

* **push** and **ack_and_reserve**, one task per call from one client, next to a raw
  psycopg loop on one autocommit connection doing the same SQL by hand (an ``INSERT`` per
  push; one ``UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING`` statement that finishes a
  task and claims the next). The raw loop keeps no history, lease or fencing token and
  applies no lifecycle rule: it is the floor the backend's work is measured against.
* **wake-up**: from just before ``push()`` to the return of a ``reserve(timeout=5)`` blocked
  in another thread (LISTEN/NOTIFY; p50 and p90).
* **worker drain** at concurrency 1 and 2, no-op tasks, against procrastinate and pgqueuer
  on the same database. Those are not Conveyor's dependencies: ``--peers`` names a Python
  that has them (e.g. a venv made with ``pip install procrastinate pgqueuer``); without it
  the comparison is skipped. Each drain is timed by polling the database from the first
  finished task to the last, so worker start-up is left out for every system alike.
  procrastinate runs ``concurrency`` sub-workers; pgqueuer runs async handlers in one
  event loop, dequeues ``batch_size`` = concurrency jobs at a time and requires
  ``max_concurrent_tasks`` of at least twice that (its entrypoint ``concurrency_limit=1``
  stalled at about one job per 2 s here, so it is not used).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from conveyor import QueueManager

sys.path.insert(0, str(Path(__file__).parent))


def timed(n: int, run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return n / (time.perf_counter() - started)


# -- one client: the backend next to raw SQL ----------------------------------------------------

RAW_TABLE = """CREATE TABLE IF NOT EXISTS bench_raw (queue text, id text, priority integer,
    data text, status text, seq bigserial, created_at double precision,
    PRIMARY KEY (queue, id))"""
RAW_INDEX = """CREATE INDEX IF NOT EXISTS bench_raw_ready ON bench_raw (queue, priority DESC,
    seq) WHERE status = 'pending'"""
RAW_INSERT = """INSERT INTO bench_raw (queue, id, priority, data, status, created_at)
    VALUES (%s, %s, %s, %s, 'pending', extract(epoch FROM clock_timestamp()))"""
RAW_ACK_AND_CLAIM = """WITH done AS (UPDATE bench_raw SET status = 'success'
        WHERE queue = %(q)s AND id = %(id)s AND status = 'processing'),
    next AS (SELECT queue, id FROM bench_raw WHERE queue = %(q)s AND status = 'pending'
        ORDER BY priority DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED)
    UPDATE bench_raw t SET status = 'processing' FROM next
    WHERE t.queue = next.queue AND t.id = next.id RETURNING t.id, t.data"""
RAW_CLAIM = """UPDATE bench_raw t SET status = 'processing' FROM (SELECT queue, id
    FROM bench_raw WHERE queue = %(q)s AND status = 'pending' ORDER BY priority DESC, seq
    LIMIT 1 FOR UPDATE SKIP LOCKED) next WHERE t.queue = next.queue AND t.id = next.id
    RETURNING t.id, t.data"""


def single_client(url: str, n: int) -> dict[str, float]:
    name = f"bp-{uuid.uuid4().hex[:8]}"
    data = {"audio_files": ["meeting.wav"], "meeting_type": "weekly_sync"}
    found: dict[str, float] = {}
    with QueueManager.from_url(url, queue_name=name) as queue:

        def push() -> None:
            for i in range(n):
                queue.push(f"p{i}", data, i % 11)

        def drain() -> None:
            message = queue.reserve(timeout=0)
            while message is not None:
                _, message = queue.ack_and_reserve(message)

        found["push"] = timed(n, push)
        found["ack_and_reserve"] = timed(n, drain)
        queue.clear()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(RAW_TABLE)
        conn.execute(RAW_INDEX)
        text = json.dumps(data)

        def raw_push() -> None:
            for i in range(n):
                conn.execute(RAW_INSERT, (name, f"p{i}", i % 11, text))

        def raw_drain() -> None:
            row = conn.execute(RAW_CLAIM, {"q": name}).fetchone()
            while row is not None:
                json.loads(row[1])
                row = conn.execute(RAW_ACK_AND_CLAIM, {"q": name, "id": row[0]}).fetchone()

        found["raw_push"] = timed(n, raw_push)
        found["raw_ack_and_reserve"] = timed(n, raw_drain)
        conn.execute("DELETE FROM bench_raw WHERE queue = %s", (name,))
    return found


def wake_ups(url: str, samples: int) -> list[float]:
    """Milliseconds from push() to a blocked reserve() returning, in another thread."""
    name = f"bw-{uuid.uuid4().hex[:8]}"
    latencies: list[float] = []
    producer = QueueManager.from_url(url, queue_name=name)
    consumer = QueueManager.from_url(url, queue_name=name)
    try:
        consumer.reserve(timeout=0.2)  # the LISTEN connection is up before the first sample
        for i in range(samples):
            returned: list[float] = []

            def take(returned: list[float] = returned) -> None:
                message = consumer.reserve(timeout=5)
                returned.append(time.perf_counter())
                if message is not None:
                    consumer.ack(message)

            thread = threading.Thread(target=take)
            thread.start()
            time.sleep(0.03)  # let it block in its wait
            pushed = time.perf_counter()
            producer.push(f"w{i}", {}, 5)
            thread.join(10)
            latencies.append((returned[0] - pushed) * 1000)
    finally:
        producer.clear()
        producer.close()
        consumer.close()
    return latencies


# -- worker drains: Conveyor, procrastinate, pgqueuer -------------------------------------------

PROCRASTINATE = """
import sys, procrastinate
url, queue, n, c, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
@app.task(name="noop", queue=queue)
def noop(i):
    return None
with app.open():
    if mode == "setup":
        try:
            app.schema_manager.apply_schema()
        except Exception:
            pass  # already there
        for start in range(0, n, 1000):
            noop.batch_defer(*({"i": i} for i in range(start, min(n, start + 1000))))
    else:
        app.run_worker(queues=[queue], concurrency=c, wait=False, install_signal_handlers=False)
"""
PROCRASTINATE_DONE = (
    "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = %s AND status = 'succeeded'"
)

PGQUEUER = """
import asyncio, sys
import psycopg
from pgqueuer import PgQueuer
from pgqueuer.db import PsycopgDriver
from pgqueuer.queries import Queries
from datetime import timedelta
url, queue, n, c, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
async def main():
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    driver = PsycopgDriver(conn)
    if mode == "setup":
        queries = Queries(driver)
        if not await queries.schema_is_installed():
            await queries.install()
        for start in range(0, n, 1000):
            size = min(n, start + 1000) - start
            await queries.enqueue([queue] * size, [None] * size, [0] * size)
        return
    pgq = PgQueuer(driver)
    done = 0
    @pgq.entrypoint(queue)
    async def noop(job):
        nonlocal done
        done += 1
        if done >= n:
            pgq.shutdown.set()
    await pgq.run(batch_size=c, max_concurrent_tasks=2 * c, dequeue_timeout=timedelta(seconds=1))
asyncio.run(main())
"""
PGQUEUER_LEFT = "SELECT count(*) FROM pgqueuer WHERE entrypoint = %s"


def _poll_rate(
    url: str,
    n: int,
    done: Callable[[psycopg.Connection[Any]], int],
    proc: subprocess.Popen[bytes],
    timeout: float = 600,
) -> float:
    """Tasks per second from the first finished task to the last, polled every 20 ms."""
    first_at = first_count = None
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            count = done(conn)
            now = time.perf_counter()
            if count > 0 and first_at is None:
                first_at, first_count = now, count
            if count >= n:
                assert first_at is not None and first_count is not None
                return (n - first_count) / max(now - first_at, 1e-6)
            if proc.poll() is not None and proc.returncode != 0:
                raise RuntimeError(f"the worker exited with {proc.returncode}")
            time.sleep(0.02)
    raise RuntimeError(f"the drain did not finish within {timeout}s")


def conveyor_drain(url: str, n: int, concurrency: int) -> float:
    from bench_worker import _spawn  # the benchmark worker: no-op pipeline, WARNING logs

    name = f"bd-{uuid.uuid4().hex[:8]}"
    with QueueManager.from_url(url, queue_name=name) as queue:
        for start in range(0, n, 1000):
            queue.push_many([(f"d{i}", {}, i % 11) for i in range(start, min(n, start + 1000))])
        proc = _spawn(url, name, concurrency, n)

        def done(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "SELECT count(*) FROM conveyor.tasks WHERE queue = %s AND status = 'success'",
                (name,),
            ).fetchone()
            return int(row[0]) if row else 0

        try:
            return _poll_rate(url, n, done, proc)  # type: ignore[arg-type]
        finally:
            proc.wait(60)
            queue.clear()


def peer_drain(  # noqa: PLR0917
    python: str, script: str, done_sql: str, url: str, n: int, c: int, left: bool = False
) -> float:
    name = f"peer_{uuid.uuid4().hex[:8]}"
    code = textwrap.dedent(script)
    subprocess.run([python, "-c", code, url, name, str(n), str(c), "setup"], check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    proc = subprocess.Popen([python, "-c", code, url, name, str(n), str(c), "run"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def done(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(done_sql, (name,)).fetchone()
        count = int(row[0]) if row else 0
        return n - count if left else count

    try:
        return _poll_rate(url, n, done, proc)  # type: ignore[arg-type]
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--n", type=int, default=5000, help="tasks per single-client run")
    parser.add_argument("--drain", type=int, default=2000, help="tasks per worker drain")
    parser.add_argument("--samples", type=int, default=100, help="wake-up samples")
    parser.add_argument("--rounds", type=int, default=3, help="single-client rounds")
    parser.add_argument("--peers", help="a Python with procrastinate and pgqueuer installed")
    args = parser.parse_args()
    print("(a loaded shared machine: compare columns within one run, not across runs)")
    # Rounds alternate the backend and the raw loop, so a load swing hits both alike.
    rounds = [single_client(args.url, args.n) for _ in range(args.rounds)]
    for op in ("push", "ack_and_reserve"):
        ours = statistics.median(r[op] for r in rounds)
        raw = statistics.median(r[f"raw_{op}"] for r in rounds)
        ratios = ", ".join(f"{r[op] / r[f'raw_{op}']:.2f}" for r in rounds)
        print(
            f"{op:<16} conveyor {ours:>8.0f}/s   raw psycopg {raw:>8.0f}/s"
            f"   ratio {ours / raw:.2f}x (medians of {args.rounds}; per round {ratios})"
        )
    wakes = wake_ups(args.url, args.samples)
    deciles = statistics.quantiles(wakes, n=10)
    print(f"wake-up          p50 {statistics.median(wakes):.2f} ms   p90 {deciles[8]:.2f} ms"
          f"   ({args.samples} samples)")  # fmt: skip
    for c in (1, 2):
        line = f"drain c{c}         conveyor {conveyor_drain(args.url, args.drain, c):>7.0f}/s"
        if args.peers:
            for label, script, sql, left in (
                ("procrastinate", PROCRASTINATE, PROCRASTINATE_DONE, False),
                ("pgqueuer", PGQUEUER, PGQUEUER_LEFT, True),
            ):
                try:
                    rate = peer_drain(args.peers, script, sql, args.url, args.drain, c, left)
                    line += f"   {label} {rate:>7.0f}/s"
                except (subprocess.SubprocessError, RuntimeError, OSError) as exc:
                    line += f"   {label} failed ({type(exc).__name__}: {exc})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
