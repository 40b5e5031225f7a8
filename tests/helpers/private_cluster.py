"""A Redis Cluster and a Sentinel set-up of the test run's own, on free loopback ports.

``PrivateCluster``: 3 masters and 3 replicas (``redis-server --cluster-enabled yes`` x6,
then ``redis-cli --cluster create ... --cluster-replicas 1``), with a small
``cluster-node-timeout`` so a killed master's replica takes over within a few seconds.
``kill_master_of(key)`` SIGKILLs the master serving a key and ``heal()`` starts it again
(it rejoins as a replica of the node that took over) and waits until every master has an
in-sync replica, so the next test finds a whole cluster.

``PrivateSentinel``: 1 master, 1 replica and 3 sentinels (quorum 2) watching service
``mymaster``, with a small ``down-after-milliseconds``; ``kill_master()`` and ``heal()``
likewise. The master and the sentinels take passwords, so every URL here carries both.

Both start in a few seconds and are meant to be started once per test session.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import redis

from .private_redis import PrivateRedis, free_port

#: Small enough that a failover takes a few seconds, large enough that a stall of a busy
#: 2-core machine is not taken for a dead node.
NODE_TIMEOUT_MS = 1500
DOWN_AFTER_MS = 1000


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()  # type: ignore[operator]
        except redis.RedisError as exc:
            last = exc
        if last is True:
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def _client(port: int, password: str | None = None) -> redis.Redis:
    return redis.Redis(
        port=port, password=password, decode_responses=True,
        socket_connect_timeout=0.5, socket_timeout=2,
    )  # fmt: skip


class PrivateCluster:
    """Six ``redis-server --cluster-enabled yes`` nodes: 3 masters, one replica each."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.nodes: list[PrivateRedis] = []
        for i in range(masters * 2):
            self.nodes.append(
                PrivateRedis(
                    workdir / f"node{i}", "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf", "--cluster-port", str(free_port()),
                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                    # A replica whose master died takes over however long its link was down.
                    "--cluster-replica-validity-factor", "0",
                    "--appendonly", "yes", "--appendfsync", "everysec",
                    start=False,
                )
            )  # fmt: skip
        self.masters = masters

    @property
    def url(self) -> str:
        """``redis+cluster://`` naming every node (any one of them would do)."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{hosts}/"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{node.port}" for node in self.nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_healthy()

    def client(self, port: int) -> redis.Redis:
        return _client(port)

    def roles(self) -> dict[int, str]:
        """port -> ``master``/``slave`` of every running node."""
        found = {}
        for node in self.nodes:
            if node.running:
                with contextlib.closing(self.client(node.port)) as client:
                    found[node.port] = str(client.info("replication")["role"])
        return found

    def master_ports(self) -> list[int]:
        return sorted(port for port, role in self.roles().items() if role == "master")

    def port_of_slot(self, slot: int) -> int:
        """The port of the master serving ``slot`` (asked of a running node)."""
        running = next(node for node in self.nodes if node.running)
        with contextlib.closing(self.client(running.port)) as client:
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise LookupError(f"no node serves slot {slot}")

    def port_of_key(self, key: str) -> int:
        running = next(node for node in self.nodes if node.running)
        with contextlib.closing(self.client(running.port)) as client:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
        return self.port_of_slot(slot)

    def node(self, port: int) -> PrivateRedis:
        return next(node for node in self.nodes if node.port == port)

    def kill_master_of(self, key: str) -> int:
        """SIGKILL the master that serves ``key``; returns its port."""
        port = self.port_of_key(key)
        self.node(port).kill()
        return port

    def _healthy(self) -> bool | str:
        masters = 0
        for node in self.nodes:
            if not node.running:
                return f"node {node.port} is down"
            with contextlib.closing(self.client(node.port)) as client:
                info = client.cluster("info")
                if info.get("cluster_state") != "ok" or int(info["cluster_slots_ok"]) != 16384:
                    return f"node {node.port}: {info.get('cluster_state')}"
                replication = client.info("replication")
                if replication["role"] == "master":
                    masters += 1
                    if int(replication.get("connected_slaves", 0)) < 1:
                        return f"master {node.port} has no replica yet"
                    lag = [v for k, v in replication.items() if k.startswith("slave")]
                    if any(entry.get("state") != "online" for entry in lag):
                        return f"master {node.port}: a replica is still syncing"
                elif replication.get("master_link_status") != "up":
                    return f"replica {node.port}: link to its master is down"
        return masters == self.masters or f"{masters} masters"

    def wait_healthy(self, timeout: float = 60.0) -> None:
        _wait(lambda: self._healthy() is True or self._healthy(), timeout, "a healthy cluster")

    def heal(self) -> None:
        """Start every killed node again (a killed master comes back as a replica of the
        node that took over) and wait until the cluster is whole."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_healthy()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class PrivateSentinel:
    """A master, its replica and three sentinels (quorum 2) for service ``mymaster``."""

    service = "mymaster"

    def __init__(
        self, workdir: Path, password: str = "master-secret", sentinel_password: str = "s-pw"
    ) -> None:
        self.workdir = workdir
        self.password = password
        self.sentinel_password = sentinel_password
        auth = ("--masterauth", password)
        self.servers = [
            PrivateRedis(workdir / "server0", *auth, aof=True, password=password, start=False)
        ]
        self.servers.append(
            PrivateRedis(
                workdir / "server1", *auth, "--replicaof", "127.0.0.1",
                str(self.servers[0].port), aof=True, password=password, start=False,
            )
        )  # fmt: skip
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return (
            f"redis+sentinel://:{self.password}@{hosts}/{self.service}/0"
            f"?sentinel_password={self.sentinel_password}"
        )

    def start(self) -> None:
        for server in self.servers:
            server.start()
        master = self.servers[0].port
        for i, port in enumerate(self.sentinel_ports):
            folder = self.workdir / f"sentinel{i}"
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "sentinel.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"requirepass {self.sentinel_password}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {master} 2\n"
                f"sentinel auth-pass {self.service} {self.password}\n"
                f"sentinel down-after-milliseconds {self.service} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.service} 10000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            log = (folder / "sentinel.log").open("ab")
            try:
                self.sentinels.append(
                    subprocess.Popen(
                        ["redis-server", str(config), "--sentinel"], stdout=log, stderr=log
                    )
                )
            finally:
                log.close()
        self.wait_healthy()

    def sentinel_client(self, port: int) -> redis.Redis:
        return _client(port, self.sentinel_password)

    def master_port(self) -> int:
        """The master the sentinels agree on (the first sentinel's answer)."""
        with contextlib.closing(self.sentinel_client(self.sentinel_ports[0])) as client:
            _, port = client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def server(self, port: int) -> PrivateRedis:
        return next(server for server in self.servers if server.port == port)

    def _healthy(self) -> bool | str:
        for server in self.servers:
            if not server.running:
                return f"server {server.port} is down"
        for port in self.sentinel_ports:
            with contextlib.closing(self.sentinel_client(port)) as client:
                info = client.sentinel_master(self.service)
                if info["is_sdown"] or info["is_odown"]:
                    return f"sentinel {port} sees the master down"
                if int(info["num-other-sentinels"]) < 2 or int(info["num-slaves"]) < 1:
                    return f"sentinel {port} does not know everyone yet"
        master = self.master_port()
        with contextlib.closing(_client(master, self.password)) as client:
            replication = client.info("replication")
        if replication["role"] != "master" or int(replication.get("connected_slaves", 0)) < 1:
            return f"{master} has no replica"
        states = [v for k, v in replication.items() if k.startswith("slave")]
        if any(entry.get("state") != "online" for entry in states):
            return "the replica is still syncing"
        return True

    def wait_healthy(self, timeout: float = 60.0) -> None:
        _wait(lambda: self._healthy() is True or self._healthy(), timeout, "healthy sentinels")

    def kill_master(self) -> int:
        port = self.master_port()
        self.server(port).kill()
        return port

    def heal(self) -> None:
        """Start a killed server again (the sentinels turn it into a replica of the current
        master) and wait until the set-up is whole."""
        for server in self.servers:
            if not server.running:
                server.start()
        self.wait_healthy()

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for server in self.servers:
            server.stop()
