"""``conveyor schedules``: every schedule the backend's schedulers run, wherever declared."""

from __future__ import annotations

import argparse
from typing import Any

from ..schedules.listing import conflicts, list_schedules
from .common import note, open_queue, out, print_json, settings_from, table, when


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "schedules",
        parents=[common],
        help="cron schedules: next and last run, the last run's status, conflicts",
        description=(
            "List the schedules every scheduler (one runs in each worker) wrote to the "
            "backend: declared in any host's config or code. Two definitions under one name "
            "are reported; exit 1 when there is such a conflict."
        ),
    )
    parser.add_argument("--json", action="store_true", help="JSON output")
    parser.add_argument(
        "--forget", metavar="NAME",
        help="remove a schedule deleted from every config from the listing (a worker that "
        "still runs it writes it again)",
    )  # fmt: skip
    parser.set_defaults(handler=schedules_command)


def schedules_command(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with open_queue(settings) as queue:
        if args.forget:
            queue.server.registry.forget_schedule(args.forget)
            out(f"schedule {args.forget!r} forgotten")
            return 0
        entries = list_schedules(queue)
    if args.json:
        print_json(entries)
        return 1 if conflicts(entries) else 0
    if not entries:
        out("no schedules: none is declared, or no worker has run one yet")
        return 0
    rows = [
        [e["name"], e["cron"], e["tz"], e["queue"], when(e["next_run"]), when(e["last_run"]),
         e["last_status"] or "-", ", ".join(e["writers"])]
        for e in entries
    ]  # fmt: skip
    headers = ["NAME", "CRON", "TZ", "QUEUE", "NEXT RUN", "LAST RUN", "LAST STATUS", "RUN BY"]
    out(table(headers, rows))
    for line in conflicts(entries):
        note(line)
    return 1 if conflicts(entries) else 0
