"""Instructions per operation, counted by callgrind: a measure that does not drift.

Rates on a shared VM drift by a quarter within minutes; ``valgrind --tool=callgrind``
counts the same instructions for the same work whatever else the machine does. Each
measure runs twice, with a small and a large N, and reports the difference divided by
the difference in N, so start-up (imports, connecting) cancels out.

    .venv/bin/python scripts/bench_instructions.py --url redis://127.0.0.1:6379/0

``client``: one process doing push + ``ack_and_reserve`` pairs. ``worker``: a worker at
concurrency 1 draining no-op tasks (``bench_worker.py``'s), its parent and its child
counted apart. Needs valgrind; about a minute. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from conveyor import QueueManager

HERE = Path(__file__).resolve().parent


def _client_loop(url: str, n: int) -> None:
    """Subprocess mode: ``n`` pushes, then ``n`` acks each claiming the next task."""
    queue = QueueManager.from_url(url, queue_name=f"bi-{uuid.uuid4().hex[:8]}")
    for i in range(n):
        queue.push(None, {"i": i}, i % 11)
    message = queue.reserve(timeout=0)
    while message is not None:
        _, message = queue.ack_and_reserve(message)
    queue.clear()
    queue.close()


def _totals(folder: str) -> list[int]:
    """Instruction totals of the callgrind outputs in ``folder``, oldest process first."""
    found = []
    for path in sorted(Path(folder).iterdir(), key=lambda p: int(p.suffix.lstrip("."))):
        lines = [line for line in path.read_text().splitlines() if line.startswith("totals:")]
        found.append(int(lines[-1].split()[1]))
    return found


def _callgrind(command: list[str], folder: str) -> list[int]:
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/cg.%p", *command],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return _totals(folder)


def client(url: str, small: int, large: int) -> float:
    runs = []
    for n in (small, large):
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, __file__, "client-loop", url, str(n)]
            runs.append(_callgrind(command, folder)[0])
    return (runs[1] - runs[0]) / (large - small)


def worker(url: str, small: int, large: int) -> tuple[float, float]:
    runs = []
    for n in (small, large):
        name = f"bi-{uuid.uuid4().hex[:8]}"
        with QueueManager.from_url(url, queue_name=name) as queue:
            queue.push_many([(f"t{i}", {}, i % 11) for i in range(n)])
            with tempfile.TemporaryDirectory() as folder:
                command = [
                    sys.executable, str(HERE / "bench_worker.py"), "serve", url, name, "1",
                    str(n), "process",
                ]  # fmt: skip
                parent, child = _callgrind(command, folder)[:2]
            queue.clear()
        runs.append((parent, child))
    per = large - small
    return (runs[1][0] - runs[0][0]) / per, (runs[1][1] - runs[0][1]) / per


def main(argv: list[str]) -> int:
    if argv and argv[0] == "client-loop":
        _client_loop(argv[1], int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=400)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(HERE))
    print(f"client: {client(args.url, args.small, args.large):,.0f} instructions per push + "
          "ack_and_reserve")  # fmt: skip
    parent, child = worker(args.url, args.small, args.large)
    print(f"worker, concurrency 1: parent {parent:,.0f}, child {child:,.0f} instructions per task")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
