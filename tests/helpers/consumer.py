"""A consumer process for the conformance suite's multi-process tests.

Run as ``python consumer.py MODE --url URL --queue NAME [options]``. It talks to the test
through stdout lines (``READY``, ``RESERVED <id> <attempts>``, ``ACK <bool>``, ``DONE <n>``)
and stdin lines (``go``, ``ack``), and records what it consumed in files outside the queue.

Modes:

* ``drain``: print READY, wait for ``go``, then reserve and ack until the queue stays empty
  for ``--idle`` seconds; append each acked id to ``--out``.
* ``hold``: reserve one task, print RESERVED, then sleep until killed.
* ``late-ack``: reserve one task, print RESERVED, wait for ``ack`` on stdin (the test pauses
  this process with SIGSTOP meanwhile), then try ack, extend and nack and print each result.
* ``ledger``: reserve (or ``--take pull``) forever; before acking, append the id to
  ``--out`` (the execution ledger); with probability ``--kill-rate`` SIGKILL itself mid-task,
  either before recording or after recording but before acking. SIGTERM stops it between
  tasks.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time

from conveyor import Message, QueueManager


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["drain", "hold", "late-ack", "ledger"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--visibility-timeout", type=float, default=60.0)
    parser.add_argument("--max-deliveries", type=int, default=5)
    parser.add_argument("--out")
    parser.add_argument("--idle", type=float, default=1.0)
    parser.add_argument("--kill-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--take", choices=["reserve", "pull"], default="reserve")
    args = parser.parse_args()
    queue = QueueManager.from_url(
        args.url,
        queue_name=args.queue,
        visibility_timeout=args.visibility_timeout,
        max_deliveries=args.max_deliveries,
    )
    modes = {"drain": drain, "hold": hold, "late-ack": late_ack, "ledger": ledger}
    return modes[args.mode](queue, args)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def append_line(path: str, line: str) -> None:
    """One O_APPEND write per line: lines from several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def drain(queue: QueueManager, args: argparse.Namespace) -> int:
    say("READY")
    if sys.stdin.readline().strip() != "go":
        return 2
    count = 0
    with open(args.out, "a", encoding="utf-8") as out:
        while (message := queue.reserve(timeout=args.idle)) is not None:
            acked = queue.ack(message, result={"pid": os.getpid()})
            out.write(f"{message.task_id} {acked}\n")
            count += 1
    say(f"DONE {count}")
    return 0


def hold(queue: QueueManager, args: argparse.Namespace) -> int:
    message = queue.reserve(timeout=10)
    if message is None:
        say("EMPTY")
        return 1
    say(f"RESERVED {message.task_id} {message.attempts}")
    while True:
        time.sleep(3600)


def late_ack(queue: QueueManager, args: argparse.Namespace) -> int:
    message = queue.reserve(timeout=10)
    if message is None:
        say("EMPTY")
        return 1
    say(f"RESERVED {message.task_id} {message.attempts}")
    if sys.stdin.readline().strip() != "ack":
        return 2
    say(f"ACK {queue.ack(message, result={'by': 'helper'})}")
    say(f"EXTEND {queue.extend(message)}")
    say(f"NACK {queue.nack(message)}")
    return 0


def ledger(queue: QueueManager, args: argparse.Namespace) -> int:
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    rng = random.Random(args.seed)
    take = queue.reserve if args.take == "reserve" else queue.pull
    say("READY")
    while not stopping:
        message = take(timeout=0.2)
        if message is None:
            continue
        run_task(queue, message, args.out, rng, args.kill_rate)
    return 0


def run_task(
    queue: QueueManager, message: Message, out: str, rng: random.Random, kill_rate: float
) -> None:
    kill = rng.random() < kill_rate
    after_record = rng.random() < 0.5
    time.sleep(rng.uniform(0, 0.004))  # the "work"
    if kill and not after_record:
        os.kill(os.getpid(), signal.SIGKILL)
    append_line(out, f"{message.task_id} {message.attempts} {os.getpid()}")
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    queue.ack(message, result={"pid": os.getpid()})


if __name__ == "__main__":
    sys.exit(main())
