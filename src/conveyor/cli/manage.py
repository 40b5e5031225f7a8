"""Commands that change things: ``task``, ``dead``, ``clear``, ``stop``."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..manager import QueueManager
from ..models import TaskStatus
from ..urls import mask_url
from . import live_cmd
from .common import (
    CliError,
    Progress,
    confirm,
    note,
    open_queue,
    out,
    print_json,
    queue_name,
    settings_from,
    shorten,
    table,
    when,
)
from .overview import show_record

_PAGE = 1000  # records per round trip when walking or purging a long list
_RETRYABLE = ("failed", "timeout", "canceled")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    queue = argparse.ArgumentParser(add_help=False)
    queue.add_argument("-q", "--queue", metavar="NAME", help="queue (default: queue.name)")
    parents = [common, queue]

    task = sub.add_parser("task", help="show, cancel or retry one task").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    show = task.add_parser("show", parents=parents, help="a task's record and history")
    show.add_argument("task_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="the whole record as JSON")
    show.set_defaults(handler=task_show)
    cancel = task.add_parser("cancel", parents=parents, help="cancel a waiting or running task")
    cancel.add_argument("task_id", metavar="ID")
    cancel.set_defaults(handler=task_cancel)
    retry = task.add_parser(
        "retry", parents=parents, help="re-drive a failed/timeout/canceled task"
    )
    retry.add_argument("task_id", metavar="ID")
    retry.set_defaults(handler=task_retry)
    live_cmd.register_watch(task, parents)

    dead = sub.add_parser("dead", help="the dead-letter list (failed tasks)").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    listing = dead.add_parser("list", parents=parents, help="failed tasks, newest first")
    listing.add_argument("--limit", type=int, default=20, metavar="N", help="show N (20)")
    listing.add_argument("--json", action="store_true", help="JSON records")
    listing.set_defaults(handler=dead_list)
    redrive = dead.add_parser("retry", parents=parents, help="re-drive one failed task or --all")
    target = redrive.add_mutually_exclusive_group(required=True)
    target.add_argument("task_id", nargs="?", metavar="ID")
    target.add_argument("--all", action="store_true", help="every failed task of the queue")
    redrive.set_defaults(handler=dead_retry)
    purge = dead.add_parser("purge", parents=parents, help="delete every failed task")
    purge.add_argument("-y", "--yes", action="store_true", help="do not ask")
    purge.set_defaults(handler=dead_purge)

    clear = sub.add_parser("clear", parents=parents, help="delete every task of a queue")
    clear.add_argument("-y", "--yes", action="store_true", help="do not ask")
    clear.set_defaults(handler=clear_command)

    stop = sub.add_parser(
        "stop",
        parents=[common],
        help="ask one worker, those of a queue (-Q) or all (--all) to shut down gracefully",
        description=(
            "Ask live workers, on any host, to stop through the backend: each stops taking "
            "tasks, finishes the running ones (up to worker.max_shutdown_wait) and exits 0. "
            "Name one WORKER_ID, or -Q QUEUE for the workers serving a queue, or --all for "
            "every worker on this backend (every queue, every host). Under supervisor "
            "(autorestart) or systemd (Restart=always) a fresh worker starts: a graceful "
            "restart. To keep them down, stop them there."
        ),
    )
    stop.add_argument("worker_id", nargs="?", metavar="WORKER_ID", help="one worker's id")
    stop.add_argument(
        "--all", action="store_true", help="every live worker (with -Q: of those queues)"
    )
    stop.add_argument(
        "-Q", "--queues", metavar="A,B", help="only workers that serve one of these queues"
    )
    stop.add_argument(
        "--wait",
        nargs="?",
        type=float,
        const=600.0,
        metavar="SECONDS",
        help="wait until they have exited (at most SECONDS, default 600)",
    )
    stop.set_defaults(handler=stop_command)


# -- task ---------------------------------------------------------------------------------


def task_show(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with open_queue(settings, queue_name(args, settings), reader=True) as queue:
        record = queue.require_task(args.task_id)
    if args.json:
        print_json(record.model_dump(mode="json"))
    else:
        show_record(record)
    return 0


def task_cancel(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with open_queue(settings, queue_name(args, settings)) as queue:
        record = queue.require_task(args.task_id)
        if not queue.cancel(args.task_id):
            raise CliError(f"task {args.task_id!r} is {record.status.value}: nothing to cancel")
    if record.status is TaskStatus.PROCESSING:
        out(f"cancel requested: task {args.task_id!r} is running and stops between its steps")
    else:
        out(f"canceled task {args.task_id!r}")
    return 0


def task_retry(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with open_queue(settings, queue_name(args, settings)) as queue:
        _retry_one(queue, args.task_id, _RETRYABLE)
    out(f"re-queued task {args.task_id!r}")
    return 0


def _retry_one(queue: QueueManager, task_id: str, allowed: tuple[str, ...]) -> None:
    record = queue.require_task(task_id)
    if record.status.value not in allowed or not queue.retry(task_id):
        raise CliError(
            f"task {task_id!r} is {record.status.value}; only {', '.join(allowed)} tasks "
            "can be retried"
        )


# -- dead ---------------------------------------------------------------------------------


def dead_list(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise CliError("--limit: must be >= 0", code=2)
    settings = settings_from(args)
    with open_queue(settings, queue_name(args, settings), reader=True) as queue:
        total = queue.stats().counts["failed"]
        records = queue.list_tasks(TaskStatus.FAILED, limit=args.limit)
    if args.json:
        print_json([record.model_dump(mode="json") for record in records])
        return 0
    out(f"{total} failed task(s) in queue {queue.queue_name!r}" + _showing(len(records), total))
    if records:
        rows = [
            [
                record.id,
                record.dead_reason,
                record.attempts,
                when(record.finished_at),
                shorten(f"{record.error.type}: {record.error.message}", 60)
                if record.error
                else None,
            ]
            for record in records
        ]
        out()
        out(table(["ID", "REASON", "ATTEMPTS", "FAILED AT", "ERROR"], rows))
    return 0


def _showing(shown: int, total: int) -> str:
    return f", newest {shown} shown" if shown < total else ""


def dead_retry(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with open_queue(settings, queue_name(args, settings)) as queue:
        if not args.all:
            _retry_one(queue, args.task_id, ("failed",))
            out(f"re-queued task {args.task_id!r}")
            return 0
        ids = _all_failed_ids(queue)
        progress = Progress("re-queued", len(ids))
        requeued = 0
        for done, task_id in enumerate(ids, start=1):
            requeued += queue.retry(task_id)
            if done % 100 == 0 or done == len(ids):
                progress.update(done)
        progress.finish()
    out(f"re-queued {requeued} of {len(ids)} failed task(s) in queue {queue.queue_name!r}")
    return 0


def _all_failed_ids(queue: QueueManager) -> list[str]:
    """A snapshot of the dead-letter list, taken before re-driving changes it."""
    ids: list[str] = []
    while True:
        page = queue.list_tasks(TaskStatus.FAILED, limit=_PAGE, offset=len(ids))
        ids.extend(record.id for record in page)
        if len(page) < _PAGE:
            return list(dict.fromkeys(ids))


def dead_purge(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with open_queue(settings, queue_name(args, settings)) as queue:
        total = queue.stats().counts["failed"]
        if total == 0:
            out(f"no failed tasks in queue {queue.queue_name!r}")
            return 0
        confirm(
            f"Delete {total} failed task(s) of queue {queue.queue_name!r} on {queue.url}?",
            yes=args.yes,
        )
        progress = Progress("purged", total)
        purged = 0
        while purged < total:  # bounded by the count confirmed: later failures are kept
            deleted = queue.delete_finished(TaskStatus.FAILED, min(_PAGE, total - purged))
            if deleted == 0:
                break
            purged += deleted
            progress.update(purged)
        progress.finish()
    out(f"purged {purged} failed task(s) from queue {queue.queue_name!r}")
    return 0


# -- clear and stop -----------------------------------------------------------------------


def clear_command(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with open_queue(settings, queue_name(args, settings)) as queue:
        counts = queue.stats().counts
        total = sum(counts.values())
        confirm(
            f"Delete all {total} task(s) of queue {queue.queue_name!r} on {queue.url} "
            f"({counts['pending']} pending, {counts['processing']} processing)?",
            yes=args.yes,
        )
        pending = queue.clear()
    out(f"cleared queue {queue.queue_name!r}: {total} task(s) deleted ({pending} were pending)")
    return 0


def stop_command(args: argparse.Namespace) -> int:
    wanted = {name.strip() for name in (args.queues or "").split(",") if name.strip()}
    if args.worker_id is not None and (args.all or args.queues is not None):
        raise CliError("stop: give a WORKER_ID, or --all / -Q QUEUE, not both", code=2)
    if args.queues is not None and not wanted:
        raise CliError("stop: -Q needs a queue name, e.g. -Q emails", code=2)
    settings = settings_from(args)
    if args.worker_id is None and not args.all and not wanted:
        raise CliError(
            "stop: say which workers: a WORKER_ID (see `conveyor workers`), -Q QUEUE for "
            "those serving a queue, or --all for every worker on "
            f"{mask_url(settings.backend_url())} (every queue, every host)",
            code=2,
        )
    with open_queue(settings) as queue:
        live = queue.workers()
        if args.worker_id is not None:
            asked = queue.request_stop(args.worker_id)
            if asked == 0:
                raise CliError(
                    f"no live worker with id {args.worker_id!r} (see `conveyor workers`)"
                )
            targets = {args.worker_id}
            out(f"asked {asked} worker(s) to stop gracefully")
        elif wanted:
            targets = {str(info["id"]) for info in live if info["id"] and _serves(info, wanted)}
            asked = sum(queue.request_stop(worker_id) for worker_id in sorted(targets))
            names = ", ".join(repr(name) for name in sorted(wanted))
            out(f"asked {asked} worker(s) serving {names} to stop gracefully")
        else:
            targets = {str(info["id"]) for info in live if info["id"]}  # damaged ones have none
            asked = queue.request_stop(None)
            out(f"asked {asked} worker(s) to stop gracefully")
        if args.wait is not None and targets:
            _wait_for_exit(queue, targets, args.wait)
    return 0


def _serves(info: dict[str, Any], wanted: set[str]) -> bool:
    """Does this heartbeat's worker take from one of the ``wanted`` queues?"""
    queues = info.get("queues")
    return isinstance(queues, list) and bool(wanted & {str(name) for name in queues})


def _wait_for_exit(queue: QueueManager, targets: set[str], timeout: float) -> None:
    deadline, reported = time.monotonic() + timeout, 0
    while True:
        left = targets & {str(info["id"]) for info in queue.workers() if info["id"]}
        if not left:
            out(f"{len(targets)} worker(s) exited")
            return
        if time.monotonic() >= deadline:
            raise CliError(f"still running after {timeout:g}s: {', '.join(sorted(left))}")
        if len(left) != reported:
            reported = len(left)
            note(f"waiting for {reported} worker(s) to finish their tasks...")
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
