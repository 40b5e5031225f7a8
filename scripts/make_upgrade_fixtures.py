"""Write the upgrade fixtures: a SQLite file and a Redis keyspace as this version stores them.

Usage (from the repository root, with the code whose layout is to be captured)::

    .venv/bin/python scripts/make_upgrade_fixtures.py [--out tests/fixtures/upgrade]

``tests/test_upgrade.py`` loads these files with the current code and checks that every task
in them keeps working: a storage change must read them (or migrate them), never lose them.
So the files are regenerated only when a new layout becomes the one to stay compatible with;
the old ones are then kept beside them under a new name, not overwritten.

Both backends get the same tasks of queue ``upgrade-q``, built through the public API only:
pending tasks of mixed and equal priorities, a delayed task due in ten years and one due a
few seconds after the script ends, leases that have run out, a lease held until 2100, a
pulled task, checkpointed steps, a success, a dead letter, a canceled task, queue timeouts
and a worker heartbeat. Written next to them:

* ``v1.db``: the SQLite file, plus a ``fixture_manifest`` table (key, JSON value) saying what
  each task is and what ``get_task`` reports for it; the test drops that table before
  opening the file.
* ``v1-sqlite.sql``: the same file as SQL text (``iterdump``), only for review and diffs.
* ``v1-redis.json``: every key of a private redis-server the script starts (so nothing else
  is in it), with type, value and remaining TTL, restorable with plain commands; plus the
  same manifest.

The text ``upgrade-q`` appears only as the queue name (and in the worker's id), so the test
can restore the Redis dump under a fresh name by replacing that text.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis

from conveyor import Message, QueueManager, TaskRecord

QUEUE = "upgrade-q"
WORKER_ID = f"{QUEUE}-w1"
FORMAT = "conveyor-upgrade-fixture/1"
#: Far enough to stay in the future for the fixture's life; today's code refuses delays of
#: more than 10 years, so the far delayed task is due at the start of 2036.
FAR_ETA = datetime(2036, 1, 1, tzinfo=UTC)
#: A lease and a heartbeat that outlive any test run: a worker that holds its task across
#: the upgrade.
HELD_UNTIL = datetime(2100, 1, 1, tzinfo=UTC).timestamp()
#: Seconds after the script ends by which every short lease, delay and queue timeout it
#: set has run out; the test waits for it only if it runs this soon after the script.
SETTLE_SECONDS = 5.0
#: Text that must survive every layout: non-ASCII, emoji, quotes, backslash, tab, newline.
TEXT = 'Grüße aus 東京 🚀 "quoted" back\\slash\ttab\nsecond line'

#: Fields of ``get_task`` recorded per task; the test compares them after the upgrade.
RECORD_FIELDS = (
    "queue", "type", "priority", "data", "attempts", "max_retries", "retry_backoff",
    "queue_timeout", "process_timeout", "created_at", "scheduled_for", "started_at",
    "finished_at", "progress", "progress_message", "result", "error", "dead_reason",
    "cancel_requested", "steps", "worker",
)  # fmt: skip

#: Each task: (status as written, status once time has acted, what it is for). Time acts
#: when a claim reaps an expired lease, promotes a due task or times out a stale one; a
#: migration may do that early, so the test accepts either status.
ROLES: dict[str, tuple[str, str | None, str]] = {
    "l-lease": ("processing", "pending", "reserved, never acked; its lease ran out: it comes "
                "back first in band 5 (a lease that expires keeps its place in line)"),
    "l-held": ("processing", None, "reserved with a lease until 2100 by a worker that lives "
               "through the upgrade: never served again; its token still acks it"),
    "c-steps": ("processing", "pending", "reserved, two steps checkpointed, progress 0.5; its "
                "lease ran out: served again carrying its steps"),
    "r-nacked": ("pending", None, "reserved, one step checkpointed, nacked with an error: "
                 "pending again with attempts 1 and its steps"),
    "s-done": ("success", None, "acked with a result"),
    "f-dead": ("failed", None, "failed by its worker: dead-lettered, dead_reason error"),
    "u-pulled": ("processing", None, "pulled (at-most-once): no lease, never served again; "
                 "its token still acks it"),
    "p5-a": ("pending", None, "priority 5, FIFO: after l-lease"),
    "p9-a": ("pending", None, "priority 9, first of its band"),
    "p5-b": ("pending", None, "priority 5, FIFO: after p5-a"),
    "p1-a": ("pending", None, "priority 1"),
    "p9-b": ("pending", None, "priority 9, FIFO: after p9-a"),
    "p5-c": ("pending", None, "priority 5, FIFO: after p5-b"),
    "q-patient": ("pending", None, "priority 0, queue_timeout of ~95 years: served last"),
    "q-expired": ("pending", "timeout", "priority 4, queue_timeout 1 s, never started: the "
                  "first claim times it out instead of serving it"),
    "x-canceled": ("canceled", None, "canceled while pending"),
    "d-future": ("scheduled", None, "delayed until 2036-01-01, priority 8: not served"),
    "d-due": ("scheduled", "pending", "delayed 2 s at creation, priority 7: due by test "
              "time, served right after band 9"),
}  # fmt: skip

#: The order in which ``reserve`` must hand the ready tasks out after the upgrade.
SERVE_ORDER = [
    "p9-a", "p9-b", "d-due", "l-lease", "p5-a", "p5-b", "p5-c", "c-steps", "r-nacked", "p1-a",
    "q-patient",
]  # fmt: skip


def must(done: object, step: str) -> None:
    """Stop when a step did not do what the fixture needs (not ``assert``: -O drops it)."""
    if not done:
        raise SystemExit(f"making the fixture failed at: {step}")


def payload(task_id: str, **extra: Any) -> dict[str, Any]:
    """A task's fixed data: every JSON kind, so a layout that mangles one shows it."""
    return {"task": task_id, "file": f"{task_id}.wav", **extra}


def populate(url: str) -> tuple[dict[str, str], float]:
    """Build the fixture's tasks on ``url`` through the public API; return tokens held by
    live workers (task id -> token) and the wall-clock time after which it is settled."""
    with QueueManager.from_url(url, queue_name=QUEUE, visibility_timeout=600.0) as queue:
        queue.consumer_id = WORKER_ID

        def reserve(task_id: str, priority: int, pull: bool = False, **options: Any) -> Message:
            """Push one task and take it: nothing else is pending while this phase runs."""
            must(queue.push(task_id, payload(task_id), priority, **options), f"push {task_id}")
            message = queue.pull(timeout=0) if pull else queue.reserve(timeout=0)
            if message is None or message.task_id != task_id:
                raise SystemExit(f"making the fixture failed: took {message} for {task_id}")
            return message

        # Phase 1: tasks that were handed out. Leases are long here, so a slow machine
        # cannot expire one before the script means to; they are cut short at the end.
        lease = reserve("l-lease", 5)
        held = reserve("l-held", 6)
        steps = reserve(
            "c-steps", 3, type="transcribe", max_retries=3, retry_backoff=2.5,
            process_timeout=120.0,
        )  # fmt: skip
        done_steps = {"download": {"bytes": 1234, "path": "/data/c.wav"}, "transcribe": TEXT}
        must(queue.checkpoint(steps, done_steps), "checkpoint c-steps")
        must(queue.set_progress(steps, 0.5, "transcribed"), "progress of c-steps")
        nacked = reserve("r-nacked", 2, type="transcribe")
        done_steps = {"download": {"bytes": 99, "path": "/data/r.wav"}}
        must(queue.checkpoint(nacked, done_steps), "checkpoint r-nacked")
        done = reserve("s-done", 5)
        must(queue.set_progress(done, 0.75, "almost"), "progress of s-done")
        result = {"words": 42, "text": TEXT, "ratio": 0.25, "ok": True}
        must(queue.ack(done, result), "ack s-done")
        dead = reserve("f-dead", 5, max_retries=0)
        trace = 'Traceback (most recent call last):\n  File "x.py", line 1\n'
        error = {"type": "ValueError", "message": f"bad input: {TEXT}", "traceback": trace}
        must(queue.fail(dead, reason="error", error=error), "fail f-dead")
        pulled = reserve("u-pulled", 5, pull=True)

        # Phase 2: ready tasks, priorities interleaved so FIFO within a band is visible.
        extra: dict[str, dict[str, Any]] = {
            "p9-a": {"text": TEXT},
            "p5-b": {"big": 9007199254740993, "neg": -1.5e-7, "none": None, "list": [1, [2]]},
            "p1-a": {"empty": "", "nested": {"a": {"b": [True, False]}}},
        }
        for task_id, priority in (("p5-a", 5), ("p9-a", 9), ("p5-b", 5), ("p1-a", 1),
                                  ("p9-b", 9), ("p5-c", 5)):  # fmt: skip
            data = payload(task_id, **extra.get(task_id, {}))
            must(queue.push(task_id, data, priority), f"push {task_id}")
        must(queue.push("q-patient", payload("q-patient"), 0, queue_timeout=3e9), "q-patient")
        must(queue.push("q-expired", payload("q-expired"), 4, queue_timeout=1.0), "q-expired")
        must(queue.push("x-canceled", payload("x-canceled"), 5), "push x-canceled")
        must(queue.cancel("x-canceled"), "cancel x-canceled")
        must(queue.push("d-future", payload("d-future"), 8, eta=FAR_ETA), "push d-future")

        # Phase 3: no claim happens after this point, so nothing below moves any more.
        nack_error = {"type": "IOError", "message": "disk full\nlater"}
        must(queue.nack(nacked, error=nack_error), "nack r-nacked")
        for message in (lease, steps):  # their leases run out at once
            must(queue.extend(message, 0.001), f"cut the lease of {message.task_id}")
        must(queue.extend(held, HELD_UNTIL - time.time()), "extend l-held to 2100")
        tokens = {m.task_id: m.token for m in (lease, held, steps, pulled)}
        info = {
            "id": WORKER_ID, "host": "fixture-host", "pid": 4242, "queues": [QUEUE],
            "concurrency": 1, "processed": 1, "failed": 1, "started_at": time.time(),
            "last_seen": time.time(), "state": "running",
            "current": [{"task_id": "l-held", "queue": QUEUE, "type": None, "step": "one"}],
        }  # fmt: skip
        stop = queue.register_worker(WORKER_ID, info, HELD_UNTIL - time.time())
        must(not stop, "heartbeat of a fresh worker")
        must(queue.push("d-due", payload("d-due"), 7, delay=2.0), "push d-due")
        return tokens, time.time() + SETTLE_SECONDS


def manifest(url: str, tokens: dict[str, str], valid_after: float) -> dict[str, Any]:
    """What the test expects: each task's role and record as today's code reports it."""
    tasks: dict[str, Any] = {}
    defaults = TaskRecord.model_construct().model_dump(mode="json")  # the optional fields
    with QueueManager.from_url(url, queue_name=QUEUE) as queue:
        for task_id, (written, after_time, role) in ROLES.items():
            record = queue.require_task(task_id)
            must(record.status.value == written, f"{task_id} is {record.status.value}")
            dumped = record.model_dump(mode="json")
            tasks[task_id] = {
                "role": role,
                "status": written,
                "after_time": after_time,
                "token": tokens.get(task_id),
                # Fields at their default (None, 0, {}) are left out to keep the file short.
                "record": {
                    field: dumped[field]
                    for field in RECORD_FIELDS
                    if field not in defaults or dumped[field] != defaults[field]
                },
                "history": [event.event for event in record.history],
            }
        workers = queue.workers()
    return {
        "format": FORMAT,
        "written_by": written_by(),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "valid_after": round(valid_after, 3),
        "queue": QUEUE,
        "worker_id": WORKER_ID,
        "workers": workers,
        "serve_order": SERVE_ORDER,
        "tasks": tasks,
    }


def written_by() -> str:
    """The commit the fixture was made with (and whether the tree had local changes)."""
    root, package = Path(__file__).resolve().parent.parent, f"conveyor {version('conveyor')}"
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return f"{package} (commit unknown)"
    return f"{package} at commit {commit}" + (" with local changes in src/" if dirty else "")


# -- SQLite ---------------------------------------------------------------------------------


def make_sqlite(out: Path) -> dict[str, Any]:
    path = out / "v1.db"
    for stale in (path, out / "v1.db-wal", out / "v1.db-shm"):
        stale.unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    tokens, valid_after = populate(url)
    expected = manifest(url, tokens, valid_after)
    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.execute("CREATE TABLE fixture_manifest (key TEXT PRIMARY KEY, value TEXT)")
            connection.executemany(
                "INSERT INTO fixture_manifest VALUES (?, ?)",
                [(key, json.dumps(value, ensure_ascii=False)) for key, value in expected.items()],
            )
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        dump = "\n".join(connection.iterdump()) + "\n"
    finally:
        connection.close()
    leftovers = [p.name for p in (out / "v1.db-wal", out / "v1.db-shm") if p.exists()]
    if leftovers:
        raise SystemExit(f"SQLite left {leftovers} next to {path}: close every connection")
    (out / "v1-sqlite.sql").write_text(dump, encoding="utf-8")
    return expected


# -- Redis ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of our own, so the dump holds this fixture's keys and nothing else."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: it is needed to write the Redis dump")
    with tempfile.TemporaryDirectory(prefix="conveyor-fixture-") as workdir:
        port = _free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
             "--save", "", "--appendonly", "yes", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"redis://127.0.0.1:{port}/0"
            _wait_ready(url, proc)
            yield url
        finally:
            proc.kill()
            proc.wait(timeout=30)


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=2)
    deadline = time.monotonic() + 30.0
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"redis-server exited with {proc.returncode}")
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


_READERS: dict[str, Callable[[redis.Redis, str], Any]] = {
    "string": lambda client, key: client.get(key),
    "hash": lambda client, key: dict(sorted(client.hgetall(key).items())),
    "zset": lambda client, key: [list(pair) for pair in client.zrange(key, 0, -1, withscores=True)],
    "set": lambda client, key: sorted(client.smembers(key)),
    "list": lambda client, key: client.lrange(key, 0, -1),
}


def dump_keys(url: str) -> list[dict[str, Any]]:
    """Every key as {key, type, pttl_ms (None: no expiry), value}; zsets as [member, score]
    in score order. Values are text (the file is UTF-8); binary would stop the script."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        entries = []
        for key in sorted(client.scan_iter(count=1000)):
            kind = str(client.type(key))
            if kind not in _READERS:
                raise SystemExit(f"{key} is a {kind}: the dump format has no place for it")
            pttl = client.pttl(key)
            value = _READERS[kind](client, key)
            entries.append(
                {"key": key, "type": kind, "pttl_ms": pttl if pttl >= 0 else None, "value": value}
            )
        return entries
    finally:
        client.close()


def make_redis(out: Path) -> dict[str, Any]:
    with private_redis() as url:
        tokens, valid_after = populate(url)
        expected = manifest(url, tokens, valid_after)
        keys = dump_keys(url)
    strays = [entry["key"] for entry in keys if not entry["key"].startswith("conveyor:")]
    if strays:
        raise SystemExit(f"keys outside Conveyor's namespace in the private server: {strays}")
    document = {**expected, "keys": keys}
    text = readable_json(document) + "\n"
    (out / "v1-redis.json").write_text(text, encoding="utf-8")
    return expected


def readable_json(value: Any, depth: int = 0) -> str:
    """JSON with one item per line, except that a value that fits on a line stays on one."""
    flat = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, dict | list) or not value or len(flat) + depth <= 96:
        return flat
    pad, end = " " * (depth + 1), " " * depth
    if isinstance(value, dict):
        items = [
            f"{pad}{json.dumps(key, ensure_ascii=False)}: {readable_json(item, depth + 1)}"
            for key, item in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    items = [pad + readable_json(item, depth + 1) for item in value]
    return "[\n" + ",\n".join(items) + "\n" + end + "]"


def compare(sqlite_side: dict[str, Any], redis_side: dict[str, Any]) -> list[str]:
    """Where the two backends report the same task differently (times aside): for review."""
    notes = []
    for task_id, left in sqlite_side["tasks"].items():
        right = redis_side["tasks"][task_id]
        for field in left["record"].keys() | right["record"].keys():
            if field.endswith("_at") or field == "scheduled_for":
                continue
            value, other = left["record"].get(field), right["record"].get(field)
            if value != other:
                notes.append(f"{task_id}.{field}: sqlite {value!r} / redis {other!r}")
        if left["history"] != right["history"]:
            notes.append(f"{task_id}.history: sqlite {left['history']} / redis {right['history']}")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/upgrade"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sqlite_side = make_sqlite(args.out)
    redis_side = make_redis(args.out)
    for name in ("v1.db", "v1-sqlite.sql", "v1-redis.json"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size} bytes)")
    for note in compare(sqlite_side, redis_side):
        print(f"backends differ: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
