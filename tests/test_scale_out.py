"""Redis Cluster and Sentinel on real servers: slots, spread, registry, durability, failover.

The cluster (3 masters, 3 replicas) and the Sentinel set-up (1 master, 1 replica, 3
sentinels, passwords on both) are the session's own (``conftest.redis_cluster``,
``redis_sentinel``); a test that kills a server heals it before it ends. The conformance
suite runs on the cluster too (tests/test_conformance.py, backend ``redis-cluster``).

The failover tests drain a queue with real ``conveyor worker`` processes while a producer
keeps pushing, SIGKILL the master that holds the queue, and keep a ledger outside the
queue (each execution appends its task id to a file): *lost* is a push that returned and
never ran, a *duplicate* a task that ran more than once. On loopback a replica is never
behind, so a kill alone loses nothing; to show what the durability option is for, the test
makes the replica lag first: it pauses the replica (SIGSTOP) and has the master drop its
replication link (CLIENT KILL TYPE replica), so what the master acknowledges from then on
exists nowhere else, as with asynchronous replication that has fallen behind. Then the
master is killed, the replica resumed and promoted, the killed master restarted (it comes
back as a replica: with ``replicas=1`` writes wait for it), and the same workers finish.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from conftest import rabbitmq_url, require_rabbitmq_server, wait_until
from conveyor import BrokerUnavailableError, QueueManager, ReplicationError
from helpers.private_cluster import PrivateCluster, PrivateSentinel
from helpers.private_redis import PrivateRedis
from helpers.worker_process import WorkerProcess

pytestmark = pytest.mark.cluster

StartWorker = Callable[..., WorkerProcess]


def cluster_client(cluster: PrivateCluster) -> RedisCluster:
    return RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, decode_responses=True)


@pytest.fixture
def cluster(redis_cluster: PrivateCluster) -> Iterator[PrivateCluster]:
    """The session's cluster, whole again after the test whatever it killed."""
    yield redis_cluster
    redis_cluster.heal()


@pytest.fixture
def sentinel(redis_sentinel: PrivateSentinel) -> Iterator[PrivateSentinel]:
    yield redis_sentinel
    redis_sentinel.heal()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- keys and slots ---------------------------------------------------------------------------


def test_every_key_a_queue_writes_is_in_its_one_slot_and_the_registry_in_another(
    cluster: PrivateCluster,
) -> None:
    """A cluster refuses a script that touches a key outside its declared slot; here every
    operation ran, and every key left behind is in the queue's slot (the per-task hashes
    the scripts build from the KEYS[4] prefix included)."""
    name = unique("slots")
    with QueueManager.from_url(cluster.url, queue_name=name, visibility_timeout=30) as queue:
        assert queue.push_many([(f"t{i}", {"i": i}, i % 3) for i in range(20)]) == [True] * 20
        assert queue.push("later", 1, delay=60)
        first = queue.reserve(timeout=1)
        assert first is not None and queue.ack(first, {"ok": True})
        second = queue.reserve(timeout=1)
        assert second is not None and queue.nack(second, delay=30)
        third = queue.reserve(timeout=1)
        assert third is not None and queue.fail(third, error="no")
        assert queue.pull(timeout=1) is not None
        assert queue.cancel("t10") and queue.retry("t10")
        assert queue.retry(third.task_id)
        queue.register_worker("w-slots", {"started_at": 0}, ttl=30)
        client = cluster_client(cluster)
        try:
            keys = sorted(client.scan_iter(match=f"conveyor:{{{name}}}:*", count=1000))
            slots = {client.keyslot(key) for key in keys}
            registry = sorted(client.scan_iter(match="conveyor:registry:*", count=1000))
            registry_slots = {client.keyslot(key) for key in registry}
        finally:
            client.close()
        print(f"{len(keys)} keys of queue {name} in slot(s) {slots}; registry keys "
              f"{registry} in slot(s) {registry_slots}")  # fmt: skip
        assert any(":task:" in key for key in keys)
        assert len(slots) == 1
        assert len(registry_slots) == 1 and len(registry) >= 3
        assert queue.workers() and name in queue.known_queues()
        queue.unregister_worker("w-slots")
        queue.clear()


def test_twelve_queues_spread_over_at_least_two_masters(cluster: PrivateCluster) -> None:
    names = [unique(f"spread{i}") for i in range(12)]
    placement: dict[str, int] = {}
    managers = [QueueManager.from_url(cluster.url, queue_name=name) for name in names]
    try:
        for queue in managers:
            assert queue.push("one", {"on": queue.queue_name})
            key = f"conveyor:{{{queue.queue_name}}}:pending"
            port = cluster.port_of_key(key)
            with contextlib.closing(cluster.client(port)) as node:
                assert node.exists(key) == 1, f"{key} is not on the master {port} serving it"
            placement[queue.queue_name] = port
        known = set(managers[0].known_queues())
    finally:
        for queue in managers:
            queue.clear()
            queue.close()
    by_master: dict[int, list[str]] = {}
    for name, port in placement.items():
        by_master.setdefault(port, []).append(name)
    print("queues per master: " + "; ".join(
        f"{port}: {len(queues)} ({', '.join(queues)})" for port, queues in sorted(by_master.items())
    ))  # fmt: skip
    assert len(by_master) >= 2
    assert set(names) <= known


def test_workers_stop_requests_and_queue_names_work_across_the_cluster(
    cluster: PrivateCluster,
) -> None:
    names = [unique(f"reg{i}") for i in range(4)]
    managers = [QueueManager.from_url(cluster.url, queue_name=name) for name in names]
    try:
        for i, queue in enumerate(managers):
            info = {"id": f"w{i}-{names[0]}", "started_at": 1.0}
            assert queue.register_worker(info["id"], info, ttl=30) is False
        listed = {w["id"] for w in managers[0].workers()}
        assert {f"w{i}-{names[0]}" for i in range(4)} <= listed
        assert set(names) <= set(managers[3].known_queues())
        assert managers[1].request_stop(f"w2-{names[0]}") == 1
        assert managers[2].register_worker(f"w2-{names[0]}", {"started_at": 1.0}, ttl=30)
        assert not managers[0].register_worker(f"w0-{names[0]}", {"started_at": 1.0}, ttl=30)
        for i, queue in enumerate(managers):
            queue.unregister_worker(f"w{i}-{names[0]}")
            queue.clear()
        assert not set(names) & set(managers[0].known_queues())
    finally:
        for queue in managers:
            queue.close()


# -- durability ------------------------------------------------------------------------------


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    """The WARNING lines loguru logs during the test (the settle warning's once-per-10-s
    limit is reset, so an earlier test cannot have used it up)."""
    from loguru import logger

    from conveyor.backends.redis import store

    store._last_warning[0] = 0.0
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    yield lines
    logger.remove(sink)


def test_a_push_fewer_replicas_confirm_raises_after_the_write_and_an_ack_only_warns(
    cluster: PrivateCluster, warnings_logged: list[str]
) -> None:
    """Each master has one replica: asking for two cannot be met. The push is stored on the
    master all the same (the error says so), and the task runs."""
    name = unique("wait")
    url = f"{cluster.url}?durability=replicas=2,timeout=0.2"
    with QueueManager.from_url(url, queue_name=name) as queue:
        started = time.monotonic()
        with pytest.raises(ReplicationError, match=r"only 1 of 2 replica\(s\) confirmed") as info:
            queue.push("a", {"n": 1})
        waited = time.monotonic() - started
        assert "stored 1 task(s) on the master" in str(info.value) and waited >= 0.2
        record = queue.get_task("a")
        assert record is not None and record.status == "pending"
        message = queue.reserve(timeout=1)
        assert message is not None and message.task_id == "a"
        assert queue.ack(message, {"ok": 1}) is True
        record = queue.get_task("a")
        assert record is not None and record.status == "success"
        queue.clear()
    assert any("only 1 of 2 replica(s) confirmed a settle" in line for line in warnings_logged)
    with QueueManager.from_url(cluster.url, queue_name=name, durability="replicas=1") as queue:
        assert queue.push("b", 2) is True  # one replica: met at once
        queue.clear()


# -- failover ----------------------------------------------------------------------------------


class Producer(threading.Thread):
    """Pushes ``ids`` in order at ``priority``, each until a push returns (True, or False: an
    earlier try of that id stored it), on its own manager; counts the errors on the way."""

    def __init__(
        self, url: str, queue_name: str, ids: list[str], data: dict[str, Any], priority: int
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.queue_name, self.ids, self.data = url, queue_name, ids, data
        self.priority = priority
        self.confirmed: list[str] = []
        self.attempts = 0
        self.errors: Counter[str] = Counter()
        self.stopping = False

    def run(self) -> None:
        with QueueManager.from_url(self.url, queue_name=self.queue_name) as queue:
            for task_id in self.ids:
                while not self.stopping:
                    self.attempts += 1
                    try:
                        queue.push(task_id, self.data, priority=self.priority)
                    except (ReplicationError, BrokerUnavailableError) as exc:
                        self.errors[type(exc).__name__] += 1
                        time.sleep(0.05)
                        continue
                    self.confirmed.append(task_id)
                    break
                time.sleep(0.004)  # pacing, so the producer does not take a whole core


@dataclass
class Deployment:
    """What a failover test needs of a cluster or a Sentinel set-up."""

    url: str
    master_of: Callable[[str], int]  # queue name -> port of the master holding it
    server: Callable[[int], PrivateRedis]
    heal: Callable[[], None]
    password: str | None = None

    def admin(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, decode_responses=True)

    def replica_of(self, port: int) -> int:
        with contextlib.closing(self.admin(port)) as client:
            return int(client.info("replication")["slave0"]["port"])

    def drop_replication(self, port: int) -> None:
        """The master closes its replicas' links: from now on its writes go nowhere else."""
        with contextlib.closing(self.admin(port)) as client:
            assert client.client_kill_filter(_type="replica") >= 1


def run_failover(
    deployment: Deployment,
    start_worker: StartWorker,
    tmp_path: Path,
    durability: str | None,
) -> dict[str, Any]:
    """Drain while pushing, kill the queue's master (its replica paused), restart it, let
    the same workers finish; return the ledger's verdict."""
    name = unique("failover")
    url = deployment.url + ("&" if "?" in deployment.url else "?") + "failover_timeout=60"
    if durability:
        url += f"&durability={durability}"
    ledger = tmp_path / "ledger.txt"
    ledger.touch()
    data = {"sleep": 0.01, "ledger": str(ledger)}

    def executed() -> list[str]:
        return [line.split()[0] for line in ledger.read_text().splitlines() if line]

    admin = QueueManager.from_url(url, queue_name=name, visibility_timeout=5)
    # The backlog is deep and more urgent than the producer's pushes, so the pushes made
    # while the replica lags are still waiting when the master is killed: had the workers
    # caught up with the producer, they would have run them, and the loss would not show.
    prefill = [f"a-{i:04d}" for i in range(400)]
    assert admin.push_many([(task_id, data, 9) for task_id in prefill]) == [True] * 400
    workers = [start_worker(url, "-Q", name) for _ in range(2)]
    wait_until(lambda: len(executed()) >= 30, 60, message="the workers to start draining")
    producer = Producer(url, name, [f"p-{i:04d}" for i in range(300)], data, priority=1)
    producer.start()
    wait_until(lambda: len(producer.confirmed) >= 50, 60, message="pushes to flow")

    master = deployment.server(deployment.master_of(name))
    replica = deployment.server(deployment.replica_of(master.port))
    replica.pause()  # it cannot reconnect, so the link dropped next stays down
    try:
        deployment.drop_replication(master.port)
        confirmed_before, attempts_before = len(producer.confirmed), producer.attempts
        if durability:  # a push now waits for the replica: one attempt is enough
            wait_until(lambda: producer.attempts > attempts_before, 10, message="a push")
        else:
            wait_until(lambda: len(producer.confirmed) >= confirmed_before + 20, 10,
                       message="pushes while the replica is paused")  # fmt: skip
        at_risk = producer.confirmed[confirmed_before:]
        master.kill()
        ran_before_the_kill = set(executed())
    finally:
        replica.resume()
    killed = time.monotonic()
    wait_until(lambda: deployment.master_of(name) != master.port, 60,
               message="the replica to take over")  # fmt: skip
    failover = time.monotonic() - killed
    deployment.heal()  # the killed master comes back as the new master's replica
    producer.join(120)
    assert not producer.is_alive(), "the producer never finished"

    def drained() -> bool:
        counts = admin.stats().counts
        return counts["pending"] + counts["processing"] + counts["scheduled"] == 0

    wait_until(drained, 120, message=lambda: f"the queue to drain: {admin.stats().counts}")
    alive = [worker.proc.poll() is None for worker in workers]
    for worker in workers:
        worker.signal(signal.SIGTERM)
    codes = [worker.wait(30) for worker in workers]
    runs = executed()
    pushed = set(prefill) | set(producer.confirmed)
    verdict = {
        "durability": durability or "none",
        "failover_s": round(failover, 1),
        "pushed": len(pushed),
        "executed": len(runs),
        "lost": sorted(pushed - set(runs)),
        "duplicates": {tid: n for tid, n in Counter(runs).items() if n > 1},
        "at_risk": len(at_risk),
        "lost_at_risk": len(set(at_risk) - set(runs)),
        "at_risk_run_before_the_kill": len(set(at_risk) & ran_before_the_kill),
        "producer_errors": dict(producer.errors),
        "workers_alive": alive,
        "exit_codes": codes,
        "logs": [worker.log() for worker in workers],
    }
    with contextlib.suppress(Exception):
        admin.clear()
    admin.close()
    print(
        f"failover ledger (durability {verdict['durability']}): pushed={verdict['pushed']} "
        f"executed={verdict['executed']} lost={len(verdict['lost'])} "
        f"duplicates={len(verdict['duplicates'])} "
        f"(extra runs {sum(verdict['duplicates'].values()) - len(verdict['duplicates'])}); "
        f"acknowledged while the replica lagged: {verdict['at_risk']}, of them lost "
        f"{verdict['lost_at_risk']}; failover took {verdict['failover_s']}s; producer "
        f"errors {verdict['producer_errors']}; workers alive {alive}, exit codes {codes}"
    )
    return verdict


def check_verdict(verdict: dict[str, Any]) -> None:
    logs = "\n".join(log[-2000:] for log in verdict["logs"])
    assert verdict["workers_alive"] == [True, True], f"a worker exited during the failover:\n{logs}"
    assert verdict["exit_codes"] == [0, 0], logs
    if verdict["durability"] != "none":
        assert verdict["lost"] == [], f"lost with durability on: {verdict['lost']}"
    else:  # the ledger bites: writes acknowledged while the replica lagged are gone
        assert verdict["lost_at_risk"] > 0, (
            "nothing acknowledged was lost: no lag was caused "
            f"({verdict['at_risk_run_before_the_kill']} of {verdict['at_risk']} at-risk pushes "
            "had run before the master was killed)"
        )


@pytest.fixture
def cluster_deployment(cluster: PrivateCluster) -> Deployment:
    return Deployment(
        url=cluster.url,
        master_of=lambda name: cluster.port_of_key(f"conveyor:{{{name}}}:pending"),
        server=cluster.node,
        heal=cluster.heal,
    )


@pytest.fixture
def sentinel_deployment(sentinel: PrivateSentinel) -> Deployment:
    return Deployment(
        url=sentinel.url,
        master_of=lambda name: sentinel.master_port(),
        server=sentinel.server,
        heal=sentinel.heal,
        password=sentinel.password,
    )


@pytest.mark.slow
@pytest.mark.parametrize("durability", [None, "replicas=1,timeout=1"], ids=["plain", "durable"])
def test_cluster_master_killed_mid_drain_workers_carry_on(
    cluster_deployment: Deployment,
    worker_process: StartWorker,
    tmp_path: Path,
    durability: str | None,
) -> None:
    check_verdict(run_failover(cluster_deployment, worker_process, tmp_path, durability))


@pytest.mark.slow
@pytest.mark.parametrize("durability", [None, "replicas=1,timeout=1"], ids=["plain", "durable"])
def test_sentinel_master_killed_mid_drain_workers_follow_the_new_master(
    sentinel_deployment: Deployment,
    worker_process: StartWorker,
    tmp_path: Path,
    durability: str | None,
) -> None:
    check_verdict(run_failover(sentinel_deployment, worker_process, tmp_path, durability))


# -- RabbitMQ over a Cluster or Sentinel task store ------------------------------------------


@pytest.mark.rabbitmq
@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
def test_rabbitmq_keeps_its_task_records_on_a_cluster_or_sentinel_store(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    require_rabbitmq_server()
    setup = request.getfixturevalue("redis_cluster" if kind == "cluster" else "redis_sentinel")
    name = unique("mq")
    with QueueManager.from_url(rabbitmq_url(tmp_path, setup.url), queue_name=name) as queue:
        try:
            assert queue.push("a", {"n": 1}, priority=3) and queue.push("b", {"n": 2}, priority=9)
            message = queue.reserve(timeout=5)
            assert message is not None and message.task_id == "b"
            assert queue.ack(message, {"ok": True})
            record = queue.get_task("b")
            assert record is not None and record.status == "success"
            assert record.result == {"ok": True}
            assert queue.stats().counts["pending"] == 1
            assert "***" in queue.url or "@" not in queue.url
        finally:
            queue.clear()


# -- conveyor doctor -----------------------------------------------------------------------------


def test_doctor_reads_every_master_of_a_cluster_and_the_sentinels_master(
    cluster: PrivateCluster,
    sentinel: PrivateSentinel,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    from conveyor.cli import main

    monkeypatch.chdir(tmp_path)  # no default config/ here
    monkeypatch.delenv("CONVEYOR_CONFIG", raising=False)

    def persistence(url: str) -> tuple[str, str]:
        main(["doctor", "--url", url, "--json"])
        out = capsys.readouterr().out
        assert sentinel.password not in out and sentinel.sentinel_password not in out
        findings = json.loads(out)["findings"]
        backend = next(f for f in findings if f["check"] == "backend")
        assert backend["status"] == "ok", backend
        found = next(f for f in findings if f["check"] == "redis persistence")
        return found["status"], found["message"]

    assert persistence(cluster.url)[0] == "ok"
    assert persistence(sentinel.url)[0] == "ok"
    one_master = cluster.master_ports()[-1]
    with contextlib.closing(cluster.client(one_master)) as client:
        client.config_set("appendonly", "no")
        try:
            status, detail = persistence(cluster.url)
        finally:
            client.config_set("appendonly", "yes")
    assert status == "problem" and "appendonly is no" in detail
