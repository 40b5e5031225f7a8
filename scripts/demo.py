"""The quick-start demo (``make run``): a batch of real tasks through a real worker, no servers.

1. Opens a fresh SQLite database in a temporary directory.
2. Pushes one ``documents`` task per text file in ``examples/docs/`` with mixed priorities
   (0..10, out of order, two tasks sharing a priority).
3. Starts ``python worker.py`` as a subprocess with concurrency 1 and
   ``CONVEYOR_WORKER__MAX_JOBS`` set to the batch size, so the worker recycles (drains and
   exits 0) by itself once the batch is done; its log lines are shown as they happen.
   The running task's progress, as its record shows it, is printed alongside.
4. Prints the order the tasks started in (from each record's ``started_at``), which must be
   highest priority first and, within one priority, push order; then a results table.

Exit code: 0 when every task succeeded in the expected order and the worker exited 0;
1 otherwise; 130 when interrupted with Ctrl+C (the worker drains and stops first).

Usage::

    python scripts/demo.py                    # about 15 s
    python scripts/demo.py --step-delay 0.05  # faster
    python scripts/demo.py --keep             # keep the database and the JSON reports
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

try:
    from conveyor import QueueManager, TaskRecord, TaskStatus
except ImportError:
    print(
        "demo: cannot import conveyor: run `make run`, or `pip install -e .` in a virtualenv",
        file=sys.stderr,
    )
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "examples" / "docs"
QUEUE = "demo"
PIPELINE = "documents"
#: Priorities in push order: spread over 0..10, deliberately out of order, with one tie
#: (two 5s) to show that equal priorities run in the order they were pushed.
PRIORITIES = (3, 9, 0, 6, 10, 5, 1, 8, 5, 2, 7, 4)
PROGRESS_POLL = 0.4  # seconds between looks at the running task's progress
_print_lock = threading.Lock()


def say(line: str) -> None:
    """Print one whole line at a time: the worker's log and the progress watcher share stdout."""
    with _print_lock:
        print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--step-delay",
        type=float,
        default=0.3,
        help="seconds each pipeline step spends showing progress (default 0.3)",
    )
    parser.add_argument(
        "--dir", type=Path, help="work in DIR (its demo.db and reports/ are replaced) and keep it"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="stop the worker after this many seconds"
    )
    args = parser.parse_args(argv)
    if args.step_delay < 0:
        parser.error("--step-delay must be >= 0")

    if args.dir is not None:
        workdir = args.dir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        for name in ("demo.db", "demo.db-wal", "demo.db-shm"):
            (workdir / name).unlink(missing_ok=True)
        shutil.rmtree(workdir / "reports", ignore_errors=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="conveyor-demo-"))
    try:
        return run(workdir, args.step_delay, args.timeout)
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"\n(removed {workdir}; run with --keep or --dir DIR to keep the reports)")
        else:
            print(f"\nThe database and the reports are in {workdir}")


def run(workdir: Path, step_delay: float, timeout: float) -> int:
    documents = sorted(DOCS.glob("*.txt"))
    if not documents:
        print(f"demo: no documents in {DOCS}", file=sys.stderr)
        return 1
    url = f"sqlite:///{workdir / 'demo.db'}"
    reports = workdir / "reports"

    print(f"Conveyor demo: {len(documents)} documents, one worker, SQLite at {url}\n")
    with QueueManager.from_url(url, queue_name=QUEUE) as queue:
        pushed = push_batch(queue, documents, reports, step_delay)
        print(
            f"\nStarting `python worker.py` (concurrency 1, max_jobs {len(pushed)}: it exits "
            "by itself when the batch is done)\n"
        )
        started = time.monotonic()
        code, interrupted = run_worker(url, len(pushed), timeout)
        elapsed = time.monotonic() - started
        print(f"\nThe worker exited with code {code} after {elapsed:.1f}s.\n")
        records = {task_id: queue.get_task(task_id) for task_id, _, _ in pushed}

    in_order = show_start_order(pushed, records)
    all_succeeded = show_results(pushed, records, workdir)
    if interrupted:
        return 130
    if code == 0 and in_order and all_succeeded:
        print(f"\nAll {len(pushed)} tasks succeeded, highest priority first.")
        return 0
    print("\nThe demo FAILED: see above.", file=sys.stderr)
    return 1


def push_batch(
    queue: QueueManager, documents: list[Path], reports: Path, step_delay: float
) -> list[tuple[str, Path, int]]:
    """Push one task per document before the worker starts; print the push table."""
    pushed = [
        (f"doc-{n + 1:02d}", path, PRIORITIES[n % len(PRIORITIES)])
        for n, path in enumerate(documents)
    ]
    queue.push_many(
        {
            "task_id": task_id,
            "data": {"path": str(path), "output_dir": str(reports), "step_delay": step_delay},
            "priority": priority,
            "type": PIPELINE,
        }
        for task_id, path, priority in pushed
    )
    print(f"Pushed {len(pushed)} tasks to queue {QUEUE!r} (pipeline {PIPELINE!r}):\n")
    print_table(
        ["id", "priority", "document"],
        [[task_id, priority, path.name] for task_id, path, priority in pushed],
        align="<><",
    )
    return pushed


def run_worker(url: str, jobs: int, timeout: float) -> tuple[int, bool]:
    """Run ``python worker.py`` until it exits; echo its log. Returns (exit code, interrupted)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CONVEYOR_") and key not in ("REDIS_URL", "RABBITMQ_URL")
    }
    env.update(
        {
            "CONVEYOR_CONFIG": str(ROOT / "config" / "development.yaml"),
            "CONVEYOR_URL": url,
            "CONVEYOR_WORKER__QUEUES": QUEUE,
            "CONVEYOR_WORKER__PIPELINES": "examples.doc_pipeline",
            "CONVEYOR_WORKER__CONCURRENCY": "1",
            "CONVEYOR_WORKER__MAX_JOBS": str(jobs),
            "CONVEYOR_LOGGING__LEVEL": "INFO",
            "CONVEYOR_LOGGING__JSON": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert process.stdout is not None

    def give_up() -> None:
        print(f"  demo: the worker is still running after {timeout:g}s; stopping it")
        process.terminate()

    def forward_term(signum: int, frame: FrameType | None) -> None:
        process.terminate()  # the worker drains and exits; we report what happened

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    done = threading.Event()
    watcher = threading.Thread(target=watch_progress, args=(url, done), daemon=True)
    watcher.start()
    previous = signal.signal(signal.SIGTERM, forward_term)
    interrupted = False
    try:
        while True:
            try:
                for line in process.stdout:
                    say("  │ " + _without_date(line.rstrip("\n")))
                break
            except KeyboardInterrupt:  # the worker got the same Ctrl+C and drains
                interrupted = True
                say("  demo: interrupted; waiting for the worker (Ctrl+C again to hurry it)")
        return process.wait(), interrupted
    finally:
        timer.cancel()
        done.set()
        watcher.join(2)
        signal.signal(signal.SIGTERM, previous)


def watch_progress(url: str, done: threading.Event) -> None:
    """Show the running task's progress as its record has it (what `conveyor task show` sees)."""
    last: tuple[str, float] | None = None
    with QueueManager.from_url(url, queue_name=QUEUE) as queue:  # its own: not thread-safe
        while not done.wait(PROGRESS_POLL):
            for record in queue.list_tasks(TaskStatus.PROCESSING, limit=5):
                seen = (record.id, record.progress)
                if seen != last and 0 < record.progress < 1:
                    last = seen
                    note = record.progress_message or ""
                    say(f"  ⋯ progress {record.id} {record.progress:4.0%}  {note}")


def show_start_order(
    pushed: list[tuple[str, Path, int]], records: dict[str, TaskRecord | None]
) -> bool:
    """Print the tasks in the order they started; True if that is the expected order."""
    started = sorted(
        (record.started_at, task_id, path, priority)
        for task_id, path, priority in pushed
        if (record := records[task_id]) is not None and record.started_at is not None
    )
    push_index = {task_id: n for n, (task_id, _, _) in enumerate(pushed)}
    expected = sorted(push_index, key=lambda t: (-pushed[push_index[t]][2], push_index[t]))
    actual = [task_id for _, task_id, _, _ in started]

    print("Order the tasks started in (from each record's started_at):\n")
    first = started[0][0] if started else None
    print_table(
        ["#", "started", "priority", "id", "document"],
        [
            [n + 1, f"+{(at - first).total_seconds():.2f}s" if first else "", prio, tid, p.name]
            for n, (at, tid, p, prio) in enumerate(started)
        ],
        align=">>><<",
    )
    order = [str(priority) for _, _, _, priority in started]
    print(f"\npriorities in start order: {' '.join(order)}")
    if actual == expected:
        print("✓ highest priority first; equal priorities in push order")
        return True
    missing = len(pushed) - len(started)
    print(
        "✗ not the expected order: expected " + " ".join(expected)
        + (f" ({missing} task(s) never started)" if missing else "")
    )  # fmt: skip
    return False


def show_results(
    pushed: list[tuple[str, Path, int]], records: dict[str, TaskRecord | None], workdir: Path
) -> bool:
    """Print one row per task; True if every task succeeded."""
    rows: list[list[Any]] = []
    ok = True
    for task_id, path, priority in sorted(pushed, key=lambda item: -item[2]):
        record = records[task_id]
        status = record.status.value if record is not None else "missing"
        result = record.result if record is not None and isinstance(record.result, dict) else {}
        summary = result.get("summary") or {}
        report = result.get("report")
        if record is None or record.status is not TaskStatus.SUCCESS:
            ok = False
            reason = record.error.message if record is not None and record.error else ""
            rows.append([path.name, priority, status, "", "", "", "", reason[:60]])
            continue
        took = (
            f"{(record.finished_at - record.started_at).total_seconds():.2f}s"
            if record.finished_at and record.started_at
            else ""
        )
        rows.append(
            [
                path.name,
                priority,
                status,
                took,
                summary.get("words", ""),
                summary.get("unique_words", ""),
                ", ".join(summary.get("top_keywords", [])[:3]),
                _relative(report, workdir),
            ]
        )
    print("\nResults:\n")
    print_table(
        [
            "document",
            "priority",
            "status",
            "took",
            "words",
            "unique",
            "top keywords",
            "report or error",
        ],
        rows,
        align="<><>>><<",
    )
    return ok


def print_table(headers: list[str], rows: list[list[Any]], align: str) -> None:
    """A plain, aligned text table: ``align`` has one ``<`` or ``>`` per column."""
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [
            cell.rjust(width) if way == ">" else cell.ljust(width)
            for cell, width, way in zip(row, widths, align, strict=True)
        ]
        return "  " + "  ".join(parts).rstrip()

    print(line(cells[0]))
    print(line(["-" * width for width in widths]))
    for row in cells[1:]:
        print(line(row))


def _relative(path: Any, base: Path) -> str:
    if not isinstance(path, str):
        return ""
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


def _without_date(line: str) -> str:
    """Log lines start with 'YYYY-MM-DD HH:MM:SS.mmm |': the date is noise here."""
    if len(line) > 11 and line[4] == "-" and line[7] == "-" and line[10] == " ":
        return line[11:]
    return line


if __name__ == "__main__":
    sys.exit(main())
