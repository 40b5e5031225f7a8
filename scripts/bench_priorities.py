"""Wait-time figures for the README's priority table: preemption, reserved slots, aging.

``python scripts/bench_priorities.py [--backends sqlite,redis,rabbitmq]`` prints a
Markdown table. Two measurements:

* **Urgent-task wait.** A worker busy with two priority-0 pipelines of ten 1-second steps;
  2.5 s later one priority-10 task is pushed. Its wait (push to first step start, from the
  step ledger) is measured with no help, with preemption (``preempt_margin`` 5) and with
  one reserved slot (concurrency 3, ``reserve: {priority: 8, slots: 1}``: the two long
  tasks take the ordinary slots).
* **Starvation bound.** One priority-0 task under a continuous stream of priority-5 tasks
  (one consumer pushing one and taking one, back to back) with ``aging_interval`` 0.2 s,
  and without aging (cut off after 10 s).

Real worker processes (``tests/helpers/run_priority_worker.py``); numbers depend on the
machine's load, so each row says what it measured, not a promise.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from conveyor import QueueManager  # noqa: E402
from helpers.priority_pipelines import read_ledger  # noqa: E402

URLS = {
    "sqlite": "sqlite:///{dir}/bench.db",
    "redis": "redis://127.0.0.1:6379/15",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/?task_store=sqlite:///{dir}/store.db",
}
WORKER = ROOT / "tests" / "helpers" / "run_priority_worker.py"


def urgent_wait(url: str, mode: str, workdir: Path) -> float:
    """Seconds from the urgent push to its first step, on a worker busy with long work."""
    queue_name = f"bench-prio-{uuid.uuid4().hex[:8]}"
    queue = QueueManager.from_url(url, queue_name=queue_name)
    ledger = workdir / f"{queue_name}.ledger"
    args = {"none": ["--concurrency", "2"],
            "preemption": ["--concurrency", "2", "--preempt-margin", "5"],
            "reserved": ["--concurrency", "3", "--reserve", "8:1"]}[mode]  # fmt: skip
    log = (workdir / f"{queue_name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "--url", url, "--queue", queue_name, *args],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        data = {"ledger": str(ledger), "seconds": 1.0, "steps": 10}
        queue.push("long-a", data, 0, type="long")
        queue.push("long-b", data, 0, type="long")
        deadline = time.monotonic() + 60
        while len({line["task"] for line in read_ledger(ledger)}) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start the long tasks ({log.name})")
            time.sleep(0.05)
        time.sleep(2.5)
        pushed = time.time()
        queue.push("urgent", {"ledger": str(ledger), "seconds": 0.05}, 10, type="quick")
        while not any(line["task"] == "urgent" for line in read_ledger(ledger)):
            if time.monotonic() > deadline + 30:
                raise RuntimeError("the urgent task never started")
            time.sleep(0.01)
        started = next(line["at"] for line in read_ledger(ledger) if line["task"] == "urgent")
        return started - pushed
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        queue.clear()
        queue.close()


def starvation(url: str, aging: float | None, cutoff: float = 10.0) -> float | None:
    """Seconds a priority-0 task waits under a stream of priority-5 work (None: never)."""
    queue_name = f"bench-aging-{uuid.uuid4().hex[:8]}"
    queue = QueueManager.from_url(url, queue_name=queue_name, aging_interval=aging)
    try:
        pushed = time.time()
        queue.push("old", {}, 0)
        n = 0
        while time.time() - pushed < cutoff:
            queue.push(f"p5-{n}", {}, 5)
            n += 1
            message = queue.reserve(timeout=1)
            if message is None:
                continue
            queue.ack(message)
            if message.task_id == "old":
                return time.time() - pushed
        return None
    finally:
        queue.clear()
        queue.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="sqlite,redis,rabbitmq")
    parser.add_argument("--aging-interval", type=float, default=0.2)
    args = parser.parse_args()
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-prio-") as tmp:
        workdir = Path(tmp)
        print("| backend | urgent wait: no help | with preemption | with a reserved slot |"
              " starvation: no aging | with aging (interval "
              f"{args.aging_interval:g}s, bound {5 * args.aging_interval:g}s) |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for name in backends:
            url = URLS[name].format(dir=workdir)
            waits = [urgent_wait(url, mode, workdir) for mode in ("none", "preemption", "reserved")]
            if name == "rabbitmq":
                starve = "n/a (aging refused)", "n/a (aging refused)"
            else:
                cells = [starvation(url, None), starvation(url, args.aging_interval)]
                starve = tuple(
                    "not started in 10 s" if cell is None else f"{cell:.2f} s" for cell in cells
                )
            print(f"| {name} | " + " | ".join(f"{wait:.2f} s" for wait in waits)
                  + f" | {starve[0]} | {starve[1]} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
