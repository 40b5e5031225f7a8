"""``conveyor worker``: run a worker process from settings, as ``python worker.py`` does."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..worker.bootstrap import run_worker
from .common import settings_from


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "worker",
        parents=[common],
        help="run a worker (until SIGTERM/SIGINT, `conveyor stop` or a recycling limit)",
        description=(
            "Run a worker: take tasks from the queues in order of preference, run their "
            "pipelines, settle them. SIGTERM or Ctrl+C drains running tasks for up to "
            "worker.max_shutdown_wait seconds, then exits 0; a second signal skips the "
            "wait. Flags override the settings file and the environment."
        ),
    )
    parser.add_argument(
        "-Q", "--queues", metavar="A,B", help="queues to take from, most important first"
    )
    parser.add_argument(
        "-c", "--concurrency", type=int, metavar="N", help="tasks run at once in this process"
    )
    parser.add_argument(
        "-P",
        "--pipeline",
        action="append",
        metavar="IMPORT.PATH",
        help="a pipeline to load, e.g. myapp.pipelines:meeting (repeatable)",
    )
    parser.add_argument(
        "--pool",
        choices=["process", "thread"],
        help="run steps in child processes (default, isolated) or in threads of the worker",
    )
    parser.add_argument("--max-jobs", type=int, metavar="N", help="recycle after N tasks")
    parser.add_argument("--max-time", type=float, metavar="SECONDS", help="recycle after this")
    parser.add_argument("--memory", type=int, metavar="MB", help="recycle above this memory")
    parser.add_argument(
        "--shutdown-mode",
        choices=["requeue", "fail"],
        help="what happens to a task still running when the shutdown wait is over",
    )
    parser.add_argument(
        "--wait",
        type=_wait_value,
        metavar="SECONDS|forever",
        help=(
            "how long to wait for an unreachable Redis/RabbitMQ at start (default "
            "worker.broker_wait: forever); 0 exits 2 at once"
        ),
    )
    parser.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ...")
    parser.set_defaults(handler=worker_command)


def _wait_value(text: str) -> float | str:
    """``forever`` or seconds >= 0 (argparse reports anything else as a usage error)."""
    if text.strip().lower() == "forever":
        return "forever"
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"want seconds (>= 0) or 'forever', got {text!r}")
    return seconds


def worker_command(args: argparse.Namespace) -> int:
    """Build settings with the flags as overrides and run until stopped (exit 0, or 2).

    The working directory joins ``sys.path`` (as with ``celery worker``), so pipelines of
    the project it runs in import by name although ``conveyor`` is an installed script.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    worker: dict[str, Any] = {}
    if args.queues is not None:
        worker["queues"] = [name.strip() for name in args.queues.split(",") if name.strip()]
    for key, value in (
        ("concurrency", args.concurrency),
        ("pool", args.pool),
        ("pipelines", args.pipeline),
        ("max_jobs", args.max_jobs),
        ("max_time", args.max_time),
        ("memory_mb", args.memory),
        ("shutdown_mode", args.shutdown_mode),
        ("broker_wait", args.wait),
    ):
        if value is not None:
            worker[key] = value
    overrides: dict[str, Any] = {"worker": worker} if worker else {}
    if args.log_level:
        overrides["logging"] = {"level": args.log_level}
    return run_worker(settings_from(args, **overrides))
