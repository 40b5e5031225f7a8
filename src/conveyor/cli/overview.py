"""Read-only commands: ``status``, ``queues``, ``workers``, ``task show``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import ConveyorError
from ..manager import QueueManager, QueueStats
from ..models import TaskRecord
from ..settings import Settings
from .common import (
    CliError,
    ago,
    open_queue,
    out,
    print_json,
    queue_name,
    settings_from,
    shorten,
    table,
    when,
)

#: Status columns in lifecycle order: waiting, running, then how tasks ended.
_COUNTS = ["pending", "scheduled", "processing", "success", "failed", "canceled", "timeout"]
_CLEAR_SCREEN = "\x1b[H\x1b[2J"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    status = sub.add_parser(
        "status",
        parents=[common],
        help="tasks per status, throughput and mean run time, for all queues or one",
        description=(
            "Counts per status (pending, scheduled, processing, success, failed, "
            "canceled, timeout), tasks done and failed in the last minute, and the mean "
            "run time of those done, for every queue on the backend or one."
        ),
    )
    status.add_argument("-q", "--queue", metavar="NAME", help="only this queue")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl+C",
    )
    status.add_argument("--json", action="store_true", help="JSON (one object per refresh)")
    status.set_defaults(handler=status_command)

    queues = sub.add_parser("queues", parents=[common], help="list the queues on the backend")
    queues.add_argument("--json", action="store_true", help="JSON output")
    queues.set_defaults(handler=queues_command)

    workers = sub.add_parser(
        "workers", parents=[common], help="live workers and what each one is doing"
    )
    workers.add_argument("-q", "--queue", metavar="NAME", help="only workers of this queue")
    workers.add_argument("--json", action="store_true", help="JSON output")
    workers.set_defaults(handler=workers_command)


# -- status ---------------------------------------------------------------------------------


def status_command(args: argparse.Namespace) -> int:
    if args.watch is not None and not args.watch > 0:
        raise CliError("--watch: the interval must be a number of seconds > 0", code=2)
    settings = settings_from(args)
    with _queues(settings) as managers:
        if args.watch is None:
            _show_status(settings, managers, args)
            return 0
        try:
            while True:
                if sys.stdout.isatty() and not args.json:
                    sys.stdout.write(_CLEAR_SCREEN)
                _show_status(settings, managers, args)
                if not args.json:
                    out(f"\nevery {args.watch:g}s; Ctrl+C to stop")
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


@contextmanager
def _queues(settings: Settings) -> Iterator[dict[str, QueueManager]]:
    """Managers opened as queues are first seen, kept across refreshes, closed at the end."""
    managers: dict[str, QueueManager] = {}
    try:
        yield managers
    finally:
        for manager in managers.values():
            with contextlib.suppress(ConveyorError):
                manager.close()


def _manager(settings: Settings, managers: dict[str, QueueManager], name: str) -> QueueManager:
    if name not in managers:
        managers[name] = QueueManager.from_settings(settings, queue_name=name, reader=True)
    return managers[name]


def _show_status(
    settings: Settings, managers: dict[str, QueueManager], args: argparse.Namespace
) -> None:
    first = _manager(settings, managers, args.queue or settings.queue.name)
    names = [args.queue] if args.queue else first.known_queues()
    stats = [_manager(settings, managers, name).stats() for name in names]
    if args.json:
        snapshot = {
            "backend": first.url,
            "at": time.time(),
            "queues": [s.model_dump() for s in stats],
        }
        if args.watch is None:
            print_json(snapshot)
        else:  # JSON lines: one snapshot per refresh
            out(json.dumps(snapshot, separators=(",", ":")))
        return
    out(f"Conveyor status: {first.url} at {when(time.time())}")
    out()
    out(status_table(stats))
    waiting = waiting_lines(stats)
    if waiting:
        out()
        out("\n".join(waiting))


def waiting_lines(stats: list[QueueStats]) -> list[str]:
    """Per queue with ready tasks: each priority's count and longest wait, and how often
    its tasks were preempted (the starvation and preemption picture at a glance)."""
    lines = []
    for each in stats:
        if not each.waiting and not each.preemptions:
            continue
        bands = "  ".join(
            f"p{band.priority}: {band.count} waiting, oldest {_seconds(band.oldest_seconds)}"
            for band in each.waiting
        )
        lines.append(f"{each.queue}: {bands or 'nothing waiting'}; preempted {each.preemptions}x")
    return lines


def status_table(stats: list[QueueStats]) -> str:
    """The status table; a TOTAL row when there is more than one queue."""
    headers = ["QUEUE", *(name.upper() for name in _COUNTS), "DONE/MIN", "FAILED/MIN", "MEAN RUN"]
    rows: list[list[Any]] = []
    for each in stats:
        rows.append(
            [
                each.queue,
                *(each.counts.get(name, 0) for name in _COUNTS),
                each.done_last_minute,
                each.failed_last_minute,
                _seconds(each.mean_run_seconds),
            ]
        )
    if len(stats) > 1:
        totals = [sum(row[i] for row in rows) for i in range(1, len(headers) - 1)]
        rows.append(["TOTAL", *totals, ""])
    if not rows:
        rows.append(["(no queues)", *([0] * len(_COUNTS)), 0, 0, None])
    return table(headers, rows, right=[len(headers) - 1])


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


# -- queues and workers ---------------------------------------------------------------------


def queues_command(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with _queues(settings) as managers:
        first = _manager(settings, managers, settings.queue.name)
        rows = []
        for name in first.known_queues():
            counts = _manager(settings, managers, name).stats().counts
            rows.append([name, counts["pending"], counts["processing"], counts["failed"]])
            rows[-1].append(sum(counts.values()))
    if args.json:
        keys = ["queue", "pending", "processing", "failed", "total"]
        print_json([dict(zip(keys, row, strict=True)) for row in rows])
    else:
        out(table(["QUEUE", "PENDING", "PROCESSING", "FAILED", "TOTAL"], rows))
    return 0


def workers_command(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with open_queue(settings, queue_name(args, settings), reader=True) as queue:
        found = queue.workers()
    if args.queue:
        found = [info for info in found if args.queue in info.get("queues", [])]
    found.sort(key=lambda info: (str(info.get("host")), str(info.get("id"))))
    if args.json:
        print_json(found)
        return 0
    if not found:
        out("no live workers" + (f" on queue {args.queue!r}" if args.queue else ""))
        return 0
    now = time.time()
    headers = ["ID", "HOST", "PID", "QUEUES", "STATE", "CURRENT", "DONE", "FAILED", "LAST SEEN"]
    rows = [
        [
            info.get("id"),
            info.get("host"),
            info.get("pid"),
            ",".join(info.get("queues", [])),
            info.get("state"),
            _current(info.get("current") or []),
            info.get("processed", 0),
            info.get("failed", 0),
            ago(info.get("last_seen"), now),
        ]
        for info in found
    ]
    out(table(headers, rows))
    return 0


def _current(tasks: list[dict[str, Any]]) -> str:
    if not tasks:
        return "-"
    parts = [f"{t.get('task_id')} ({t['step']})" if t.get("step") else str(t.get("task_id"))
             for t in tasks]  # fmt: skip
    return shorten(", ".join(parts), 50)


# -- one task -------------------------------------------------------------------------------


def show_record(record: TaskRecord) -> None:
    """A task's record as ``key: value`` lines, then its history."""

    def at(moment: Any) -> str | None:
        return when(moment) if moment is not None else None

    progress = f"{record.progress:.0%}"
    if record.progress_message:
        progress += f" {record.progress_message}"
    error = f"{record.error.type}: {record.error.message}" if record.error else None
    result = shorten(_json(record.result), 200) if record.result is not None else None
    fields: list[tuple[str, Any]] = [
        ("id", record.id), ("queue", record.queue), ("status", record.status.value),
        ("type", record.type), ("priority", record.priority), ("attempts", record.attempts),
        ("max retries", record.max_retries), ("worker", record.worker),
        ("created", at(record.created_at)), ("scheduled for", at(record.scheduled_for)),
        ("started", at(record.started_at)), ("finished", at(record.finished_at)),
        ("progress", progress), ("cancel asked", "yes" if record.cancel_requested else None),
        ("dead reason", record.dead_reason), ("error", error),
        ("data", shorten(_json(record.data), 200)), ("result", result),
        ("steps done", ", ".join(record.steps) or None),
        ("damaged", "; ".join(record.damage) or None),
    ]  # fmt: skip
    for key, value in fields:
        if value is not None:
            out(f"{key + ':':<15}{value}")
    if record.history:
        out("history:")
        for event in record.history:
            extra = f" ({event.note})" if event.note else ""
            out(f"  {when(event.at)}  {event.event}{extra}  attempt {event.attempt}")


def _json(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)
