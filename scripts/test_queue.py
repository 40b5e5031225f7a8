"""Smoke test of a queue backend: ``python scripts/test_queue.py [URL]``, on any backend.

Usage::

    python scripts/test_queue.py                          # embedded SQLite in a temp dir
    python scripts/test_queue.py redis://localhost:6379/0
    python scripts/test_queue.py amqp://guest:guest@localhost:5672/

An ``amqp://`` URL without ``task_store=`` gets a temporary SQLite task store. Each step
prints one ✅/❌ line. It uses its own queue (``smoke-<random>``) and clears it at
the end, so it is safe against a shared broker. Exit code: 0 all passed, 1 a step failed,
2 the broker is unreachable or the URL is wrong (one line, no traceback).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

try:
    from conveyor import BrokerUnavailableError, ConfigError, Message, QueueManager
except ImportError:
    print(
        "❌ cannot import conveyor: run `make run`, or `pip install -e .` in a virtualenv",
        file=sys.stderr,
    )
    sys.exit(2)

SEED_DATA = {"audio_files": ["meeting.wav"], "meeting_type": "weekly_sync"}


def step_connect(queue: QueueManager) -> str:
    queue.ping()
    return f"{queue.backend_kind.value} answers at {queue.url}"


def step_push(queue: QueueManager) -> str:
    assert queue.push("task_123", SEED_DATA, 5) is True, "push returned False"
    assert queue.push("task_123", SEED_DATA, 5) is False, "a duplicate live id was accepted"
    return "task_123 enqueued at priority 5 (a second push of the same id is refused)"


def step_pull(queue: QueueManager) -> str:
    queue.push("task_123", SEED_DATA, 5)
    message = queue.pull(timeout=1)
    assert message is not None, "nothing pulled within 1s"
    got = (message["task_id"], message["data"], message["priority"])
    assert got == ("task_123", SEED_DATA, 5), f"got {got!r}"
    return "task_id, data and priority round-trip"


def step_priority(queue: QueueManager) -> str:
    for priority in (1, 5, 10, 3):
        queue.push(f"p{priority}", {"priority": priority}, priority)
    order = [_pull(queue).priority for _ in range(4)]
    assert order == [10, 5, 3, 1], f"pulled priorities {order}, expected [10, 5, 3, 1]"
    return "pushed 1, 5, 10, 3; pulled 10, 5, 3, 1"


def step_length(queue: QueueManager) -> str:
    assert queue.get_queue_length() == 0, "a fresh queue is not empty"
    for n in range(3):
        queue.push(f"len-{n}", {"n": n}, 5)
    assert queue.get_queue_length() == 3, f"length {queue.get_queue_length()} after 3 pushes"
    _pull(queue)
    assert queue.get_queue_length() == 2, f"length {queue.get_queue_length()} after a pull"
    return "0 → 3 after three pushes → 2 after a pull"


def step_fifo(queue: QueueManager) -> str:
    ids = [f"fifo-{n}" for n in range(5)]
    for task_id in ids:
        queue.push(task_id, {}, 7)
    order = [_pull(queue).task_id for _ in ids]
    assert order == ids, f"pulled {order}"
    return "five tasks of one priority come out in push order"


def step_reserve_ack(queue: QueueManager) -> str:
    queue.push("leased", {"x": 1}, 5)
    message = queue.reserve(timeout=1)
    assert message is not None, "nothing reserved within 1s"
    assert queue.get_queue_length() == 0, "a leased task still counts as pending"
    assert queue.ack(message, {"ok": True}), "ack refused"
    record = queue.get_task("leased")
    assert record is not None and record.status == "success", f"record {record!r}"
    return "leased, acked, status success"


def step_clear(queue: QueueManager) -> str:
    for n in range(3):
        queue.push(f"clear-{n}", {}, 5)
    removed = queue.clear()
    assert removed == 3, f"clear() reported {removed}, expected 3"
    assert queue.get_queue_length() == 0, "tasks left after clear()"
    assert queue.pull(timeout=0) is None, "pulled a task after clear()"
    return "3 removed, queue empty"


STEPS: list[tuple[str, Callable[[QueueManager], str]]] = [
    ("connect (ping)", step_connect),
    ("push", step_push),
    ("pull", step_pull),
    ("priority order", step_priority),
    ("queue length", step_length),
    ("FIFO within a priority", step_fifo),
    ("reserve + ack", step_reserve_ack),
    ("clear", step_clear),
]


def _pull(queue: QueueManager) -> Message:
    message = queue.pull(timeout=1)
    assert message is not None, "queue ran dry"
    return message


def run(queue: QueueManager) -> bool:
    """Run every step on a fresh queue; a broker error stops the run (it is not a ❌)."""
    passed = True
    for name, step in STEPS:
        if step is not step_connect:
            queue.clear()
        try:
            detail = step(queue)
        except BrokerUnavailableError:
            raise
        except AssertionError as exc:
            passed = False
            print(f"❌ {name}: {exc}")
        except Exception as exc:  # any other error is this step's failure, with its type
            passed = False
            print(f"❌ {name}: {type(exc).__name__}: {exc}")
        else:
            print(f"✅ {name}: {detail}")
    return passed


def with_task_store(url: str, workdir: Path) -> str:
    """RabbitMQ keeps no task state: an amqp:// URL without ``task_store`` gets a temporary
    SQLite task store here (instead of ``conveyor-rabbitmq.db`` in the working directory)."""
    if url.startswith(("amqp://", "amqps://")) and "task_store=" not in url:
        return f"{url}{'&' if '?' in url else '?'}task_store=sqlite:///{workdir}/tasks.db"
    return url


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-smoke-"))
    url = with_task_store(argv[0], workdir) if argv else f"sqlite:///{workdir}/conveyor-smoke.db"
    queue_name = f"smoke-{uuid.uuid4().hex[:8]}"
    try:
        with QueueManager.from_url(url, queue_name=queue_name) as queue:
            print(f"Conveyor smoke test: {queue.url}, queue {queue_name}")
            try:
                passed = run(queue)
            finally:
                queue.clear()
    except (BrokerUnavailableError, ConfigError) as exc:
        print(f"❌ {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("all steps passed" if passed else "some steps FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
