"""Running workers ride out broker outages: nothing lost, no worker exits, work resumes.

Real ``conveyor worker`` processes (``helpers.worker_process``: 1 s connect timeout, so a
3 s Redis socket timeout; a 5 s lease; a 0.5 s heartbeat) drain a queue of short
``ops_pipeline`` tasks while a test breaks what they stand on: a private Redis (AOF on) is
SIGKILLed and restarted or SIGSTOPped, the private RabbitMQ node's app is stopped and
started, a RabbitMQ task store is killed, a TCP proxy drops or black-holes the
connections, and a worker gets SIGTERM while its Redis is down.

Each test ends with a ledger (``helpers.run_ledger``): ``lost`` must be 0; duplicates
(late outcomes that fencing refused, and acks lost with the last second of an AOF) are
counted and printed. The outage-to-resume time is measured from the worker logs: from the
moment the broker answers again to the first task acknowledged after it (target 2 s).
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import redis

from conftest import REDIS_URL, wait_until
from conveyor import ConveyorError, QueueManager
from helpers import run_ledger
from helpers.private_rabbitmq import PrivateRabbitMQ
from helpers.private_redis import PrivateRedis
from helpers.tcp_proxy import TcpProxy
from helpers.worker_process import WorkerProcess

pytestmark = pytest.mark.slow

RedisFactory = Callable[..., PrivateRedis]
Workers = Callable[..., WorkerProcess]
GONE = "Running tasks carry on"  # from the worker's one line when its backend goes away
BACK = "answers again after"  # ... and when it is back
SUCCEEDED = "| succeeded in"
SOCKET_TIMEOUT = 3.0  # Redis: 2 x the workers' 1 s connect timeout, at least 3 s
RESUME_LIMIT = 8.0  # the target is 2 s; the bound leaves room for a loaded machine
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \|")


# -- helpers ------------------------------------------------------------------------------------


def push(queue: QueueManager, count: int, ledger: Path, sleep: float) -> list[str]:
    ids = [f"t{i:04d}" for i in range(count)]
    data = {"sleep": sleep, "ledger": str(ledger)}
    for start in range(0, count, 500):
        batch = ids[start : start + 500]
        assert queue.push_many([(task_id, data, 5) for task_id in batch]) == [True] * len(batch)
    return ids


def successes(queue: QueueManager) -> int:
    return queue.stats().counts["success"]


def wait_for_successes(queue: QueueManager, count: int, timeout: float = 60.0) -> None:
    wait_until(
        lambda: successes(queue) >= count, timeout=timeout, interval=0.1,
        message=lambda: f"{count} successes; counts {queue.stats().counts}",
    )  # fmt: skip


def start_workers(make: Workers, url: str, count: int, *args: str) -> list[WorkerProcess]:
    workers = [make(url, *args) for _ in range(count)]
    for worker in workers:
        worker.wait_for(" started: queues=", timeout=60)
    return workers


def stay_alive(workers: list[WorkerProcess], seconds: float) -> None:
    """The outage lasts ``seconds``; every worker must live through it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for worker in workers:
            assert worker.proc.poll() is None, f"a worker exited:\n{worker.log()[-3000:]}"
        time.sleep(0.1)


def log_times(worker: WorkerProcess, text: str) -> list[float]:
    """Wall-clock times of the worker's log lines that contain ``text``."""
    times = []
    for line in worker.log().splitlines():
        stamp = _STAMP.match(line)
        if stamp and text in line:
            times.append(datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp())
    return times


def restart(action: Callable[[], object], answers: Callable[[], bool]) -> float:
    """Run ``action`` (a restart) while polling ``answers`` on a thread every 10 ms; the
    wall-clock time it first answered, the outage's end as workers could see it."""
    first: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set() and not first:
            with contextlib.suppress(Exception):
                if answers():
                    first.append(time.time())
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        action()
        wait_until(lambda: first, timeout=30, message="the restarted server to answer")
    finally:
        done.set()
        poller.join()
    return first[0]


def redis_answers(server: PrivateRedis) -> Callable[[], bool]:
    def ping() -> bool:
        client = redis.Redis(port=server.port, socket_timeout=0.2, socket_connect_timeout=0.2)
        try:
            return bool(client.ping())
        finally:
            client.close()

    return ping


def resumed_after(workers: list[WorkerProcess], answered: float, timeout: float = 30.0) -> float:
    """Seconds from ``answered`` (wall clock) to the first task acknowledged after it."""

    def first() -> float | None:
        later = [t for w in workers for t in log_times(w, SUCCEEDED) if t >= answered - 0.001]
        return min(later) if later else None

    found = wait_until(first, timeout=timeout, interval=0.05, message="a success after restart")
    return max(0.0, found - answered)


def count_in_log(worker: WorkerProcess, text: str, count: int, timeout: float) -> float:
    """Wait until ``text`` appears ``count`` times in the worker's log; returns when."""
    wait_until(
        lambda: worker.log().count(text) >= count, timeout=timeout, interval=0.02,
        message=lambda: f"{count} x {text!r} in the log:\n{worker.log()[-3000:]}",
    )  # fmt: skip
    return time.monotonic()


def finish(workers: list[WorkerProcess], pids: list[int]) -> None:
    """The same processes that started are alive, and each stops cleanly on SIGTERM."""
    assert [worker.proc.pid for worker in workers] == pids
    for worker in workers:
        assert worker.proc.poll() is None, f"a worker exited:\n{worker.log()[-3000:]}"
        worker.signal(signal.SIGTERM)
    for worker in workers:
        assert worker.wait(timeout=30) == 0, worker.log()[-3000:]
        assert "Traceback" not in worker.log()


@dataclass(frozen=True)
class Drill:
    """What every outage test uses: a worker factory, a queue name, a ledger file."""

    workers: Workers
    queue_name: str
    ledger: Path
    tmp_path: Path

    def start(self, url: str, count: int) -> list[WorkerProcess]:
        """``count`` workers with concurrency 2 on the drill's queue, started and logging."""
        return start_workers(self.workers, url, count, "-Q", self.queue_name, "-c", "2")


@pytest.fixture
def drill(worker_process: Workers, tmp_path: Path) -> Drill:
    return Drill(worker_process, f"outage-{uuid.uuid4().hex[:6]}", tmp_path / "ledger.txt",
                 tmp_path)  # fmt: skip


# -- Redis ------------------------------------------------------------------------------------


def test_redis_killed_mid_drain_for_5s_then_30s_nothing_lost_and_no_worker_exits(
    private_redis: RedisFactory, drill: Drill
) -> None:
    server = private_redis(aof=True)
    queue = QueueManager.from_url(server.url, queue_name=drill.queue_name, connect_timeout=1)
    ids = push(queue, 600, drill.ledger, sleep=0.05)
    workers = drill.start(server.url, 2)
    pids = [worker.proc.pid for worker in workers]
    for number, (seconds, progress) in enumerate([(5, 120), (30, 300)], start=1):
        wait_for_successes(queue, progress)
        server.kill()
        for worker in workers:
            count_in_log(worker, GONE, number, timeout=15)
        stay_alive(workers, seconds)
        answered = restart(server.start, redis_answers(server))
        resume = resumed_after(workers, answered)
        for worker in workers:
            count_in_log(worker, BACK, number, timeout=15)
        print(f"Redis killed for {seconds}s: work resumed {resume:.2f}s after it answered")
        assert resume < RESUME_LIMIT
    wait_for_successes(queue, len(ids), timeout=90)
    result = run_ledger.check(queue, ids, drill.ledger, "redis killed 5 s + 30 s")
    finish(workers, pids)
    for worker in workers:  # one line when it goes, one when it is back: per outage
        assert worker.log().count(GONE) == 2 and worker.log().count(BACK) == 2
    queue.close()
    assert result.lost == []


def test_redis_frozen_longer_than_the_socket_timeout_is_an_outage_ridden_out(
    private_redis: RedisFactory, drill: Drill
) -> None:
    server = private_redis(aof=True)
    queue = QueueManager.from_url(server.url, queue_name=drill.queue_name, connect_timeout=1)
    ids = push(queue, 200, drill.ledger, sleep=0.05)
    workers = drill.start(server.url, 1)
    pids = [workers[0].proc.pid]
    wait_for_successes(queue, 40)
    server.pause()
    frozen = time.monotonic()
    noticed = count_in_log(workers[0], GONE, 1, timeout=SOCKET_TIMEOUT + 10) - frozen
    print(f"a frozen Redis was noticed after {noticed:.2f}s (socket timeout {SOCKET_TIMEOUT}s)")
    assert noticed < SOCKET_TIMEOUT + 3
    stay_alive(workers, max(0.0, SOCKET_TIMEOUT + 2 - (time.monotonic() - frozen)))
    answered = restart(server.resume, redis_answers(server))
    resume = resumed_after(workers, answered)
    print(f"Redis frozen for {time.monotonic() - frozen:.1f}s: work resumed {resume:.2f}s "
          "after SIGCONT")  # fmt: skip
    assert resume < RESUME_LIMIT
    wait_for_successes(queue, len(ids))
    result = run_ledger.check(queue, ids, drill.ledger, "redis frozen")
    finish(workers, pids)
    queue.close()
    assert result.lost == []


def test_credentials_refused_while_running_are_said_loudly_and_ridden_out(
    private_redis: RedisFactory, drill: Drill
) -> None:
    server = private_redis()
    queue = QueueManager.from_url(server.url, queue_name=drill.queue_name, connect_timeout=1)
    ids = push(queue, 100, drill.ledger, sleep=0.05)
    workers = drill.start(server.url, 1)
    pids = [workers[0].proc.pid]
    wait_for_successes(queue, 20)
    admin = redis.Redis(port=server.port)  # authenticated before the password is set
    try:
        admin.config_set("requirepass", "rotated-secret")  # a rotation: old clients refused
        admin.client_kill_filter(_type="normal", skipme=True)
        count_in_log(workers[0], "refused the worker's credentials", 1, timeout=15)
        stay_alive(workers, 2)
        answered = restart(lambda: admin.config_set("requirepass", ""), lambda: True)
    finally:
        admin.close()
    resume = resumed_after(workers, answered)
    print(f"credentials refused, then accepted again: work resumed {resume:.2f}s later")
    assert resume < RESUME_LIMIT
    wait_for_successes(queue, len(ids))
    result = run_ledger.check(queue, ids, drill.ledger, "credentials refused while running")
    finish(workers, pids)
    assert "rotated-secret" not in workers[0].log()
    queue.close()
    assert result.lost == []


def test_cut_connections_between_worker_and_redis_never_hang_and_lose_nothing(
    private_redis: RedisFactory, tcp_proxy: Callable[[int], TcpProxy], drill: Drill
) -> None:
    server = private_redis(aof=True)
    proxy = tcp_proxy(server.port)
    queue = QueueManager.from_url(server.url, queue_name=drill.queue_name, connect_timeout=1)
    ids = push(queue, 300, drill.ledger, sleep=0.05)
    workers = drill.start(f"redis://127.0.0.1:{proxy.port}/0", 1)
    pids = [workers[0].proc.pid]
    wait_for_successes(queue, 40)
    assert proxy.drop() >= 1  # reset every connection: the worker opens new ones
    wait_for_successes(queue, 100, timeout=20)
    proxy.blackhole()  # a partition: open sockets, nothing moves
    cut = time.monotonic()
    gone = workers[0].log().count(GONE) + 1
    noticed = count_in_log(workers[0], GONE, gone, timeout=SOCKET_TIMEOUT + 10) - cut
    print(f"a black-holed connection was noticed after {noticed:.2f}s")
    assert noticed < SOCKET_TIMEOUT + 3
    stay_alive(workers, 5)
    answered = restart(proxy.restore, lambda: True)
    resume = resumed_after(workers, answered)
    print(f"black hole for {time.monotonic() - cut:.1f}s: work resumed {resume:.2f}s after "
          "the partition healed")  # fmt: skip
    assert resume < SOCKET_TIMEOUT + RESUME_LIMIT  # a probe may be waiting out its timeout
    wait_for_successes(queue, len(ids))
    result = run_ledger.check(queue, ids, drill.ledger, "redis connections cut")
    finish(workers, pids)
    queue.close()
    assert result.lost == []


def test_sigterm_while_redis_is_down_exits_0_in_time_and_the_tasks_come_back(
    private_redis: RedisFactory, drill: Drill
) -> None:
    server = private_redis(aof=True)
    queue = QueueManager.from_url(server.url, queue_name=drill.queue_name, connect_timeout=1)
    # Two long tasks still run when the wait is over (interrupted), two short ones finish
    # during it: neither outcome can be sent.
    ids = [f"t{i:04d}" for i in range(6)]
    queue.push_many(
        [(task_id, {"sleep": 8.0 if i < 2 else 0.5, "ledger": str(drill.ledger)}, 9 - i)
         for i, task_id in enumerate(ids)]
    )  # fmt: skip
    wait_s = 2.0
    worker = drill.workers(
        server.url, "-Q", drill.queue_name, "-c", "4",
        env={"CONVEYOR_WORKER__MAX_SHUTDOWN_WAIT": str(wait_s)},
    )  # fmt: skip
    worker.wait_for("| started task_id=t0003", timeout=60)
    running = re.findall(r"\| started task_id=(\S+)", worker.log())
    server.kill()
    worker.wait_for(GONE, timeout=15)
    stopped = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(timeout=wait_s + 30)
    elapsed = time.monotonic() - stopped
    log = worker.log()
    print(f"SIGTERM during the outage: exit {code} after {elapsed:.2f}s "
          f"(max_shutdown_wait {wait_s:g}s)")  # fmt: skip
    assert code == 0, log[-3000:]
    assert elapsed < wait_s + 5
    unsent = {task: ops for ops, task in re.findall(r"not sent \(([^)]*)\).* task_id=(\S+)", log)}
    print(f"outcomes logged as not sent: {unsent}")
    assert "hand_back" in unsent["t0000"] and "hand_back" in unsent["t0001"]  # interrupted
    assert "ack" in unsent["t0003"]  # finished during the wait, Redis already gone
    assert set(unsent) <= set(running)
    server.start()
    rescuer = drill.start(server.url, 1)
    wait_for_successes(queue, len(ids), timeout=60)  # after the 5 s leases ran out
    result = run_ledger.check(queue, ids, drill.ledger, "SIGTERM while Redis is down")
    finish(rescuer, [rescuer[0].proc.pid])
    queue.close()
    assert result.lost == []


# -- RabbitMQ ---------------------------------------------------------------------------------


class Rabbit:
    """The session's private node, and the managers a test opens on it (cleared after)."""

    def __init__(self, node: PrivateRabbitMQ) -> None:
        self.node = node
        self.opened: list[QueueManager] = []

    def queue(self, url: str, name: str) -> QueueManager:
        queue = QueueManager.from_url(url, queue_name=name, connect_timeout=2)
        self.opened.append(queue)
        return queue


@pytest.fixture
def rabbit(rabbitmq_node: PrivateRabbitMQ) -> Iterator[Rabbit]:
    rabbit = Rabbit(rabbitmq_node)
    yield rabbit
    rabbitmq_node.ensure_running()
    for queue in rabbit.opened:
        with contextlib.suppress(ConveyorError):
            queue.clear()
        queue.close()


def task_store(kind: str, drill: Drill) -> str:
    """The task store of a RabbitMQ test: SQLite, or the shared Redis, over which a
    worker's children settle and claim on AMQP connections of their own (the direct
    hand-off), so the outage hits those connections too."""
    if kind == "redis":
        return f"task_store={REDIS_URL}"
    return f"task_store=sqlite:///{drill.tmp_path}/store.db"


def settled_by_children(workers: list[WorkerProcess], kind: str) -> None:
    """Over a Redis store, the children did settle tasks themselves (else the drill did
    not test their connections)."""
    if kind == "redis":
        assert any("(settled by its child)" in worker.log() for worker in workers)


STORES = pytest.mark.parametrize(
    "store_kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]
)


@pytest.mark.rabbitmq
@STORES
def test_rabbitmq_restarted_mid_drain_nothing_lost_and_no_worker_exits(
    rabbit: Rabbit, drill: Drill, store_kind: str
) -> None:
    url = rabbit.node.amqp_url(task_store(store_kind, drill))
    queue = rabbit.queue(url, drill.queue_name)
    ids = push(queue, 300, drill.ledger, sleep=0.05)
    workers = drill.start(url, 2)
    pids = [worker.proc.pid for worker in workers]
    wait_for_successes(queue, 80)
    rabbit.node.stop_app()
    for worker in workers:
        count_in_log(worker, GONE, 1, timeout=15)
    stay_alive(workers, 3)
    answered = restart(rabbit.node.start_app, rabbit.node.accepting)
    resume = resumed_after(workers, answered)
    print(f"RabbitMQ stop_app/start_app: work resumed {resume:.2f}s after it accepted again")
    assert resume < RESUME_LIMIT
    wait_for_successes(queue, len(ids), timeout=90)
    result = run_ledger.check(queue, ids, drill.ledger, "rabbitmq restart")
    settled_by_children(workers, store_kind)
    finish(workers, pids)
    assert result.lost == []


@pytest.mark.rabbitmq
def test_a_rabbitmq_task_store_outage_is_ridden_out_too(
    private_redis: RedisFactory, rabbit: Rabbit, drill: Drill
) -> None:
    store = private_redis(aof=True)
    url = rabbit.node.amqp_url(f"task_store={store.url}")
    queue = rabbit.queue(url, drill.queue_name)
    ids = push(queue, 300, drill.ledger, sleep=0.05)
    workers = drill.start(url, 2)
    pids = [worker.proc.pid for worker in workers]
    wait_for_successes(queue, 80)
    store.kill()
    for worker in workers:
        count_in_log(worker, GONE, 1, timeout=15)
    stay_alive(workers, 5)
    answered = restart(store.start, redis_answers(store))
    resume = resumed_after(workers, answered)
    print(f"task store (Redis) killed for 5s: work resumed {resume:.2f}s after it answered")
    assert resume < RESUME_LIMIT
    wait_for_successes(queue, len(ids), timeout=90)
    result = run_ledger.check(queue, ids, drill.ledger, "rabbitmq task store killed")
    finish(workers, pids)
    assert result.lost == []


@pytest.mark.rabbitmq
@STORES
def test_cut_connections_between_worker_and_rabbitmq_never_hang_and_lose_nothing(
    rabbit: Rabbit, tcp_proxy: Callable[[int], TcpProxy], drill: Drill, store_kind: str
) -> None:
    store = task_store(store_kind, drill)
    proxy = tcp_proxy(rabbit.node.port)
    queue = rabbit.queue(rabbit.node.amqp_url(store), drill.queue_name)
    ids = push(queue, 300, drill.ledger, sleep=0.05)
    workers = drill.start(f"amqp://guest:guest@127.0.0.1:{proxy.port}/?{store}", 1)
    pids = [workers[0].proc.pid]
    wait_for_successes(queue, 40)
    assert proxy.drop() >= 1  # the connection is reset: its deliveries go back, it reconnects
    wait_for_successes(queue, 100, timeout=30)
    proxy.blackhole()
    cut = time.monotonic()
    gone = workers[0].log().count(GONE) + 1
    noticed = count_in_log(workers[0], GONE, gone, timeout=15) - cut
    print(f"a black-holed AMQP connection was noticed after {noticed:.2f}s (connect timeout 1s)")
    assert noticed < 5
    stay_alive(workers, 5)
    answered = restart(proxy.restore, lambda: True)
    resume = resumed_after(workers, answered)
    print(f"AMQP black hole for {time.monotonic() - cut:.1f}s: work resumed {resume:.2f}s "
          "after the partition healed")  # fmt: skip
    assert resume < RESUME_LIMIT
    wait_for_successes(queue, len(ids), timeout=90)
    result = run_ledger.check(queue, ids, drill.ledger, "rabbitmq connections cut")
    settled_by_children(workers, store_kind)
    finish(workers, pids)
    assert result.lost == []
