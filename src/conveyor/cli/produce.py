"""``conveyor push``: one task from JSON, or many from a JSON list / JSON-lines file."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from ..errors import TaskValidationError
from ..manager import DEFAULT_PRIORITY, QueueManager
from ..validation import decode_json
from .common import CliError, Progress, open_queue, out, queue_name, settings_from

_INDEX = re.compile(r"^tasks\[(\d+)\]")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "push",
        parents=[common],
        help="push a task (or --many tasks from a file)",
        description=(
            'Push one task; prints its id. DATA is JSON (\'{"doc": "a.txt"}\'), @FILE '
            "or @- for stdin. With --many, DATA holds a JSON list or JSON lines of task "
            'objects {"data": ..., "id", "priority", "type", "delay", "max_retries"}; '
            "the flags are defaults for keys a task leaves out. Every task is checked "
            "before the first is written."
        ),
    )
    parser.add_argument("data", nargs="?", default="{}", metavar="DATA", help="JSON or @FILE")
    parser.add_argument("-q", "--queue", metavar="NAME", help="queue (default: queue.name)")
    parser.add_argument("--type", metavar="PIPELINE", help="the pipeline that runs it")
    parser.add_argument("-p", "--priority", type=int, metavar="N", help="0..10, larger first")
    parser.add_argument("--delay", type=float, metavar="SECONDS", help="run no sooner")
    parser.add_argument("--id", dest="task_id", metavar="ID", help="task id (default: new)")
    parser.add_argument("--max-retries", type=int, metavar="N", help="retries after errors")
    parser.add_argument(
        "--retry-backoff", type=_backoff, metavar="S[,S...]",
        help="seconds before the first retry (doubling), or a list of delays: 60,300,900",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency-key", metavar="KEY", help="per-key limit: the key this task counts against"
    )
    parser.add_argument(
        "--max-concurrency", type=int, metavar="N", help="at most N tasks of the key run at once"
    )
    parser.add_argument("--many", action="store_true", help="DATA holds many tasks")
    parser.add_argument("--batch-size", type=int, default=500, metavar="N", help="per trip")
    parser.set_defaults(handler=push_command)


def _backoff(text: str) -> float | list[float]:
    """``--retry-backoff 5`` (a base delay) or ``--retry-backoff 60,300,900`` (a list)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give seconds (5) or a comma-separated list of seconds (60,300,900)"
        ) from None
    return values if "," in text else values[0]


def push_command(args: argparse.Namespace) -> int:
    text = _read_data(args.data)
    settings = settings_from(args)
    with open_queue(settings, queue_name(args, settings)) as queue:
        if args.many:
            return _push_many(queue, args, text)
        data = _parse_json(text, "DATA", queue.max_json_depth)
        task_id = queue.submit(
            data,
            priority=DEFAULT_PRIORITY if args.priority is None else args.priority,
            task_id=args.task_id,
            type=args.type,
            delay=args.delay,
            max_retries=args.max_retries,
            retry_backoff=args.retry_backoff,
            concurrency_key=args.concurrency_key,
            max_concurrency=args.max_concurrency,
        )
        if task_id is None:
            raise CliError(
                f"task {args.task_id!r} is already scheduled, pending or running in queue "
                f"{queue.queue_name!r}; not pushed again"
            )
        out(task_id)
    return 0


def _push_many(queue: QueueManager, args: argparse.Namespace, text: str) -> int:
    if args.batch_size < 1:
        raise CliError("--batch-size: must be at least 1", code=2)
    # Two levels more than a task's data: the list, then the task object.
    tasks, lines = _parse_tasks(text, queue.max_json_depth + 2)
    defaults = {
        "priority": args.priority,
        "type": args.type,
        "delay": args.delay,
        "max_retries": args.max_retries,
        "retry_backoff": args.retry_backoff,
        "concurrency_key": args.concurrency_key,
        "max_concurrency": args.max_concurrency,
    }
    items = []
    for index, task in enumerate(tasks):
        try:
            items.append(_with_defaults(task, defaults))
        except (ValueError, TypeError) as exc:
            raise CliError(_where(f"tasks[{index}]: {exc}", lines), code=2) from None
    try:
        queue.check_many(items)
    except (ValueError, TypeError) as exc:
        raise CliError(_where(str(exc), lines) + "; nothing was pushed", code=2) from None
    progress = Progress("pushed", len(items))
    stored = 0
    for start in range(0, len(items), args.batch_size):
        stored += sum(queue.push_many(items[start : start + args.batch_size]))
        progress.update(min(start + args.batch_size, len(items)))
    progress.finish()
    skipped = len(items) - stored
    out(
        f"pushed {stored} of {len(items)} task(s) to queue {queue.queue_name!r}"
        + (f"; {skipped} already queued or running, skipped" if skipped else "")
    )
    return 0


def _read_data(value: str) -> str:
    if not value.startswith("@"):
        return value
    path = value[1:]
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", code=2) from None
    except UnicodeDecodeError:
        raise CliError(f"cannot read {path}: not UTF-8 text", code=2) from None


def _parse_json(text: str, what: str, max_depth: int) -> Any:
    """JSON from the user; too deep (``queue.max_json_depth``) or invalid is a usage error
    (exit 2), whatever the input: 100 000 nested brackets too."""
    try:
        return decode_json(what, text, max_depth)
    except TaskValidationError as exc:
        raise CliError(f"{what} {exc.reason}", code=2) from None


def _parse_tasks(text: str, max_depth: int) -> tuple[list[Any], list[int]]:
    """Tasks from a JSON list or JSON lines, with the line each one starts on."""
    if text.lstrip().startswith("["):
        tasks = _parse_json(text, "the task list", max_depth)
        return tasks, []
    tasks, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            tasks.append(_parse_json(line, f"line {number}", max_depth - 1))
            lines.append(number)
    return tasks, lines


def _with_defaults(task: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(task, dict):
        raise TypeError(f"must be a JSON object with a 'data' key, got {type(task).__name__}")
    item = dict(task)
    if "id" in item:
        item["task_id"] = item.pop("id")
    if "data" not in item:
        raise ValueError("needs a 'data' key (the task's payload)")
    for key, value in defaults.items():
        if value is not None:
            item.setdefault(key, value)
    return item


def _where(message: str, lines: list[int]) -> str:
    """``tasks[3].priority: ...`` gains the file line for JSON-lines input."""
    match = _INDEX.match(message)
    if match and lines and int(match.group(1)) < len(lines):
        return f"line {lines[int(match.group(1))]}: {message}"
    return message
