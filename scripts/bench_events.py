"""Benchmark live events: the time from a transition to its delivery over SSE and over MQTT.

A measurement, not a test. Usage::

    python scripts/bench_events.py                               # Redis at 127.0.0.1:6379/0
    python scripts/bench_events.py --url sqlite:///tmp/b.db --n 300 --json

It starts ``conveyor api`` and ``conveyor mqtt`` as subprocesses (as deployed), follows a
fresh queue (``bench-events-<random>``) over SSE with httpx and over MQTT with a paho
subscriber (Mosquitto at --mqtt), then runs ``--n`` tasks one after another (push, reserve,
progress, ack: four events each). An event's latency is its arrival time minus its ``at``
field, the transition's time on the backend's own clock (Redis ``TIME``; on one host the
same clock as ``time.time()``). The queue is cleared and its keys deleted at the end (never
a FLUSHDB).
"""

from __future__ import annotations

import argparse
import json
import os
import queue as queue_module
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion

from conveyor import QueueManager
from conveyor.events.mqtt import status_topic


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(latencies: list[float]) -> dict[str, Any]:
    if not latencies:
        return {"count": 0}
    ms = [value * 1000 for value in latencies]
    return {"count": len(ms), "p50_ms": round(percentile(ms, 0.5), 3),
            "p99_ms": round(percentile(ms, 0.99), 3), "max_ms": round(max(ms), 3),
            "mean_ms": round(statistics.fmean(ms), 3)}  # fmt: skip


def follow_sse(base: str, queue: str, sink: queue_module.Queue[tuple[float, dict[str, Any]]],
               ready: threading.Event, stop: threading.Event) -> None:  # fmt: skip
    with (
        httpx.Client(base_url=base, timeout=None) as client,
        client.stream("GET", "/api/v1/events", params={"queue": queue}) as response,
    ):
        ready.set()
        for line in response.iter_lines():
            if stop.is_set():
                return
            if line.startswith("data:"):
                sink.put((time.time(), json.loads(line[5:].strip())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--n", type=int, default=300, help="tasks (4 events each)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-sse", action="store_true", help="measure MQTT alone")
    parser.add_argument(
        "--pace",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds between tasks (0: as fast as one client goes)",
    )
    args = parser.parse_args()

    name = f"bench-events-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="bench-events-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(CONVEYOR_URL=args.url, CONVEYOR_QUEUE__NAME=name)
    queue = QueueManager.from_url(args.url, queue_name=name)
    port = free_port()
    cli = [sys.executable, "-c", "from conveyor.cli import main; raise SystemExit(main())"]
    api = subprocess.Popen([*cli, "api", "--port", str(port), "--log-level", "WARNING"],
                           env=env, cwd=work)  # fmt: skip
    bridge = subprocess.Popen([*cli, "mqtt", "--broker", args.mqtt, "-q", name, "--qos", "1",
                               "--state", str(work / "mqtt.json")], env=env, cwd=work,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    sse: queue_module.Queue[tuple[float, dict[str, Any]]] = queue_module.Queue()
    mqtt: queue_module.Queue[tuple[float, dict[str, Any]]] = queue_module.Queue()
    stop, ready = threading.Event(), threading.Event()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        if args.no_sse:
            ready.set()
        else:
            threading.Thread(target=follow_sse, args=(base, name, sse, ready, stop),
                             daemon=True).start()  # fmt: skip
        parts = urlsplit(args.mqtt)
        sub = Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex}")
        subscribed = threading.Event()
        sub.on_message = lambda c, u, m: (
            m.payload and mqtt.put((time.time(), json.loads(m.payload)))
        )
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        sub.loop_start()
        sub.subscribe(status_topic("conveyor", name, "x").replace("/x/", "/+/"), qos=1)
        if not (ready.wait(30) and subscribed.wait(30)):
            raise SystemExit("the SSE stream or the MQTT subscription did not start")
        # Warm up until the bridge publishes (it starts after the API and subscriber).
        queue.push("warm-up", {}, 1)
        warm_deadline = time.monotonic() + 30
        seen_sse = seen_mqtt = False
        seen_sse = args.no_sse
        while not (seen_sse and seen_mqtt) and time.monotonic() < warm_deadline:
            seen_sse = seen_sse or not sse.empty()
            seen_mqtt = seen_mqtt or not mqtt.empty()
            time.sleep(0.05)
        queue.clear()
        time.sleep(0.5)
        for q in (sse, mqtt):
            while not q.empty():
                q.get()
        expected = 4 * args.n
        started = time.perf_counter()
        for i in range(args.n):
            queue.push(f"t{i}", {"i": i}, 1)
            message = queue.reserve(timeout=5)
            assert message is not None
            queue.set_progress(message, 0.5)
            queue.ack(message, {"i": i})
            if args.pace:
                time.sleep(args.pace)
        elapsed = time.perf_counter() - started

        def collect(q: queue_module.Queue[tuple[float, dict[str, Any]]]) -> list[float]:
            found: list[float] = []
            end = time.monotonic() + 60
            while len(found) < expected and time.monotonic() < end:
                try:
                    arrived, body = q.get(timeout=1)
                except queue_module.Empty:
                    continue
                if str(body.get("task_id", body.get("id", ""))).startswith("t"):
                    found.append(arrived - float(body["at"]))
            return found

        result = {
            "url": queue.url, "tasks": args.n, "events": expected,
            "transitions_per_s": round(expected / elapsed),
            "sse": summary(collect(sse)), "mqtt": summary(collect(mqtt)),
            "note": "one host, every process on the same 2 shared cores",
        }  # fmt: skip
        print(json.dumps(result, indent=None if args.json else 2))
        sub.loop_stop()
        return 0
    finally:
        stop.set()
        for process in (api, bridge):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        queue.clear()
        if args.url.startswith("redis"):
            admin = __import__("redis").Redis.from_url(args.url)
            keys = list(admin.scan_iter(match=f"conveyor:{{{name}}}:*", count=1000))
            if keys:
                admin.delete(*keys)
        queue.close()


if __name__ == "__main__":
    raise SystemExit(main())
