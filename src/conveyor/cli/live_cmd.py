"""Live commands: ``conveyor events [--follow]``, ``conveyor task watch ID`` and
``conveyor mqtt`` (the MQTT status bridge)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any

from ..backends.eventlog import RESET, LiveEvent
from ..events import Follower
from ..lifecycle import FINISHED_STATUSES, TaskStatus
from .common import CliError, open_queue, out, printable, queue_name, settings_from

_BAR = 30


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    events = sub.add_parser(
        "events", parents=[common], help="print task events (--follow: as they happen)",
        description="Print the events the queues' logs keep (pushed, started, progress, "
        "retrying, succeeded, ...), oldest first; with --follow, keep printing new ones "
        "until Ctrl+C. Without --queue: every known queue.",
    )  # fmt: skip
    events.add_argument("-q", "--queue", action="append", metavar="NAME", help="queue (repeat)")
    events.add_argument("--task", metavar="ID", help="only this task's events")
    events.add_argument("-f", "--follow", action="store_true", help="wait for new events")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.set_defaults(handler=events_command)

    mqtt = sub.add_parser(
        "mqtt", parents=[common], help="publish task statuses to an MQTT broker",
        description="Publish every task's status to conveyor/{queue}/tasks/{id}/status "
        "(retained; cleared when the record expires) until Ctrl+C or SIGTERM; resumes "
        "after the last published event (--state). Needs the 'mqtt' extra. The password "
        "may come from CONVEYOR_MQTT_PASSWORD instead of the URL.",
    )  # fmt: skip
    mqtt.add_argument("--broker", metavar="URL", default=os.environ.get("CONVEYOR_MQTT_URL"),
                      help="mqtt://[user[:pass]@]host[:1883] or mqtts://... "
                      "(default $CONVEYOR_MQTT_URL, else mqtt://127.0.0.1:1883)")  # fmt: skip
    mqtt.add_argument("-q", "--queue", action="append", metavar="NAME",
                      help="queue (repeat; default: every known queue at start)")  # fmt: skip
    mqtt.add_argument("--qos", type=int, default=1, choices=(0, 1, 2), help="default 1")
    mqtt.add_argument(
        "--state",
        metavar="PATH",
        default="conveyor-mqtt.json",
        help="where the bridge keeps its position (default %(default)s)",
    )
    mqtt.add_argument("--client-id", default="", metavar="ID", help="MQTT client id")
    mqtt.add_argument("--topic-prefix", default="conveyor", metavar="PREFIX")
    mqtt.add_argument("--ca-file", metavar="PATH", help="TLS: CA certificates (PEM)")
    mqtt.add_argument("--cert-file", metavar="PATH", help="TLS: client certificate (PEM)")
    mqtt.add_argument("--key-file", metavar="PATH", help="TLS: client key (PEM)")
    mqtt.add_argument(
        "--insecure",
        action="store_true",
        help="TLS without checking the broker's certificate (tests only)",
    )
    mqtt.add_argument(
        "--sweep-every",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds between checks for expired records (default 60)",
    )
    mqtt.set_defaults(handler=mqtt_command)


def register_watch(task: Any, parents: list[argparse.ArgumentParser]) -> None:
    watch = task.add_parser("watch", parents=parents, help="a live progress bar until it ends")
    watch.add_argument("task_id", metavar="ID")
    watch.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds")
    watch.set_defaults(handler=task_watch)


def _line(event: LiveEvent) -> str:
    moment = datetime.fromtimestamp(event.at, tz=UTC).strftime("%H:%M:%S.%f")[:-3]
    if event.event == RESET:
        return f"{moment} {event.queue} reset: events were trimmed before they were read"
    text = (f"{moment} {event.queue} {event.task_id} {event.event} {event.status} "
            f"attempt={event.attempt} progress={event.progress * 100:.0f}%")  # fmt: skip
    if event.worker:
        text += f" worker={event.worker}"
    if event.note:
        text += f" {event.note}"
    return printable(text)


def events_command(args: argparse.Namespace) -> int:
    import json

    settings = settings_from(args)
    with open_queue(settings) as manager:
        names = args.queue or sorted(set(manager.known_queues()) | {settings.queue.name})
        logs = [manager.server.events(name) for name in names]
        start = None if args.follow else {log.queue_name: "0" for log in logs}
        if start is not None and manager.backend_kind.value != "sqlite":
            start = {log.queue_name: "0-0" for log in logs}
        follower = Follower(logs, start, task_id=args.task, idle=0.5)
        try:
            for event in follower:
                if event is None:
                    if not args.follow:
                        break
                    continue
                out(json.dumps(event.to_dict()) if args.json else _line(event))
                sys.stdout.flush()
        finally:
            follower.stop()
            for log in logs:
                log.close()
    return 0


def _bar(record_progress: float, status: str, note: str | None) -> str:
    filled = round(max(0.0, min(record_progress, 1.0)) * _BAR)
    bar = "#" * filled + "-" * (_BAR - filled)
    return printable(f"[{bar}] {record_progress * 100:3.0f}% {status}{f' {note}' if note else ''}")


def task_watch(args: argparse.Namespace) -> int:
    """Exit 0 when the task succeeded, 1 when it ended otherwise or the timeout passed."""
    settings = settings_from(args)
    with open_queue(settings, queue_name(args, settings)) as manager:
        follower = Follower([manager.event_log()], None, task_id=args.task_id, idle=0.5)
        record = manager.require_task(args.task_id)
        tty = sys.stdout.isatty()
        deadline = None if args.timeout is None else time.monotonic() + args.timeout

        def show(progress: float, status: str, note: str | None) -> None:
            text = _bar(progress, status, note)
            sys.stdout.write(f"\r{text}\x1b[K" if tty else f"{text}\n")
            sys.stdout.flush()

        show(record.progress, record.status, record.progress_message)
        status: str = record.status
        if status not in FINISHED_STATUSES:
            for event in follower:
                if deadline is not None and time.monotonic() > deadline:
                    break
                if event is None:
                    continue
                seen = event
                if event.event == RESET:
                    fresh = manager.require_task(args.task_id)
                    seen = LiveEvent("", fresh.queue, fresh.id, "status", fresh.status,
                                     fresh.attempts, fresh.progress, 0.0,
                                     note=fresh.progress_message)  # fmt: skip
                show(seen.progress, seen.status, seen.note if seen.event == "progress"
                     else seen.event)  # fmt: skip
                status = seen.status
                if status in FINISHED_STATUSES:
                    break
            follower.stop()
        if tty:
            sys.stdout.write("\n")
        if status not in FINISHED_STATUSES:
            raise CliError(f"task {args.task_id!r} is still {status} after {args.timeout:g}s")
        return 0 if status == TaskStatus.SUCCESS else 1


def mqtt_command(args: argparse.Namespace) -> int:
    from urllib.parse import quote, urlsplit, urlunsplit

    from ..events.mqtt import BrokerOptions, MqttBridge
    from ..logs import configure_logging

    settings = settings_from(args)
    configure_logging(settings.logging)
    url = args.broker or "mqtt://127.0.0.1:1883"
    password = os.environ.get("CONVEYOR_MQTT_PASSWORD")
    parts = urlsplit(url)
    if password and parts.username and not parts.password:
        host = parts.netloc.rsplit("@", 1)[-1]
        netloc = f"{parts.username}:{quote(password, safe='')}@{host}"
        url = urlunsplit(parts._replace(netloc=netloc))
    options = BrokerOptions(
        url=url, qos=args.qos, client_id=args.client_id, ca_file=args.ca_file,
        cert_file=args.cert_file, key_file=args.key_file, insecure=args.insecure,
        topic_prefix=args.topic_prefix,
    )  # fmt: skip
    with open_queue(settings) as manager:
        names = args.queue or sorted(set(manager.known_queues()) | {settings.queue.name})
        server = manager.server
        bridge = MqttBridge(
            [server.events(name) for name in names], server.records, options, args.state,
            result_ttl=settings.queue.result_ttl, sweep_every=args.sweep_every,
        )  # fmt: skip
        signal.signal(signal.SIGTERM, lambda *_: bridge.stop())
        bridge.start()
        try:
            bridge.run()
        except KeyboardInterrupt:
            bridge.stop()
        finally:
            bridge.close()
    return 0
