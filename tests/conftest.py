"""Fixtures shared by the conformance suite: one set of tests, parametrized over backends.

A backend joins the suite by adding one entry to :data:`BACKENDS` and one branch to
:func:`_url_for`; every test that takes ``backend_url`` (directly or through ``make_queue``)
then runs against it. ``redis-cluster`` is the Redis backend on a Redis Cluster of the
session's own (3 masters, 3 replicas: ``redis_cluster``); a cluster has only database 0,
so its tests keep apart by queue name, as they do on the shared Redis.

A backend that needs a server skips on a laptop when the server does not answer, and fails
when ``CI`` is ``"true"``: CI never passes by silently skipping a backend.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue as queue_module
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conveyor import QueueManager
from helpers.private_cluster import PrivateCluster, PrivateSentinel
from helpers.private_rabbitmq import PrivateRabbitMQ, rabbitmq_installed
from helpers.private_redis import PrivateRedis
from helpers.tcp_proxy import TcpProxy
from helpers.worker_process import WorkerProcess

T = TypeVar("T")

# A suite started in the background of a non-interactive shell (`make test &`, nohup) inherits
# SIGINT ignored, and so would every command it starts; the tests that press Ctrl+C on a
# command need the default, which a Python handler passes on as SIG_DFL across exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

HELPERS = Path(__file__).parent / "helpers"
REDIS_URL = os.environ.get("CONVEYOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
#: The broker for the RabbitMQ backend; each test adds its own task store to the URL. A short
#: heartbeat makes a paused (SIGSTOP) consumer lose its connection, and so its deliveries,
#: within seconds, and proves heartbeats keep flowing while the test process is busy.
RABBITMQ_URL = os.environ.get(
    "CONVEYOR_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/?heartbeat=2"
)
IN_CI = os.environ.get("CI", "").lower() == "true"
#: The PostgreSQL server; the session creates a database of its own on it (and drops it).
POSTGRES_ADMIN_URL = os.environ.get(
    "CONVEYOR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

#: The backends the conformance suite runs against: (name, marks).
BACKENDS = {
    "sqlite": (),
    "redis": (pytest.mark.redis,),
    "rabbitmq": (pytest.mark.rabbitmq,),
    # RabbitMQ over the Redis task store: where a worker's children settle by themselves.
    "rabbitmq-redis": (pytest.mark.rabbitmq, pytest.mark.redis),
    "redis-cluster": (pytest.mark.cluster,),
    "postgres": (pytest.mark.postgres,),
}
#: The backends a test runs on unless it names them: the conformance suite adds the
#: cluster (``backend_params(*ALL)``); the slower process and API tests stay on these.
#: ``CONVEYOR_TEST_BACKENDS=redis-cluster`` (comma-separated) runs them elsewhere.
DEFAULT_BACKENDS = tuple(
    name.strip()
    for name in os.environ.get("CONVEYOR_TEST_BACKENDS", "sqlite,redis,rabbitmq").split(",")
    if name.strip()
)
#: RabbitMQ over Redis differs from RabbitMQ by its task store, which Redis's run covers:
#: the suite runs it where the worker's children settle (``CONVEYOR_TEST_RABBITMQ_STORE``
#: runs the whole RabbitMQ suite over Redis).
ALL = tuple(name for name in BACKENDS if name != "rabbitmq-redis")


def backend_params(*names: str) -> list[Any]:
    """``pytest.param`` entries (with their marks) for the named backends, the default
    three when none are named."""
    return [pytest.param(name, id=name, marks=BACKENDS[name]) for name in names or DEFAULT_BACKENDS]


def is_redis(url: str) -> bool:
    """Any Redis deployment: one server, a cluster, a Sentinel-watched master."""
    return url.split("://", 1)[0] in ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel")


def redis_admin(url: str, decode: bool = True) -> Any:
    """A plain redis-py client for a test Redis URL: a ``RedisCluster`` for a cluster (its
    ``scan_iter`` covers every master), else ``redis.Redis``. ``decode=False`` for keys
    that may not be UTF-8 (the garbage tests write some)."""
    import redis
    from redis.cluster import RedisCluster

    if url.startswith("redis+cluster://"):
        first = url.split("://", 1)[1].split("/", 1)[0].split(",", 1)[0]
        host, port = first.rsplit(":", 1)
        return RedisCluster(host=host, port=int(port), decode_responses=decode, socket_timeout=5)
    return redis.Redis.from_url(
        url, decode_responses=decode, socket_connect_timeout=1, socket_timeout=5
    )


def redis_keys(url: str, pattern: str) -> list[str]:
    """Keys matching ``pattern`` on every master of a Redis URL (a cluster's too)."""
    client = redis_admin(url)
    try:
        return sorted(str(key) for key in client.scan_iter(match=pattern, count=1000))
    finally:
        client.close()


def unavailable(reason: str) -> None:
    """Skip on a laptop, fail in CI: a backend the suite cannot reach is never a pass."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


def require_backend_module(name: str) -> None:
    """Skip (fail in CI) when the backend's module has not been written yet."""
    if importlib.util.find_spec(f"conveyor.backends.{name}") is None:
        unavailable(f"conveyor.backends.{name} does not exist yet")


def require_redis_server(url: str = REDIS_URL) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"no Redis server answers at {url}: {exc}")
    finally:
        client.close()


def require_rabbitmq_server(url: str = RABBITMQ_URL) -> None:
    import pika

    parameters = pika.URLParameters(url)
    parameters.socket_timeout = parameters.blocked_connection_timeout = 2
    parameters.connection_attempts = 1
    try:
        pika.BlockingConnection(parameters).close()
    except pika.exceptions.AMQPError as exc:
        unavailable(f"no RabbitMQ server answers at {url}: {exc!r}")


def require_postgres_server(url: str = POSTGRES_ADMIN_URL) -> None:
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.Error as exc:
        unavailable(f"no PostgreSQL server answers at {url}: {exc}")


def postgres_database_url(name: str) -> str:
    """The admin URL with another database name."""
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def create_postgres_database(name: str) -> str:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_database_url(name)


def drop_postgres_database(name: str) -> None:
    import psycopg

    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn,
    ):
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


_SESSION_DATABASE: list[str] = []


def session_postgres_database() -> str:
    """A database of this test session's own (``conveyor_test_<pid>``), created on first
    use and dropped when the session ends (``pytest_sessionfinish``)."""
    if not _SESSION_DATABASE:
        require_backend_module("postgres")
        require_postgres_server()
        _SESSION_DATABASE.append(create_postgres_database(f"conveyor_test_{os.getpid()}"))
    return _SESSION_DATABASE[0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SESSION_DATABASE:
        drop_postgres_database(f"conveyor_test_{os.getpid()}")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The session's own PostgreSQL database (see :func:`session_postgres_database`)."""
    return session_postgres_database()


def rabbitmq_url(tmp_path: Path, store: str | None = None) -> str:
    """The test broker's URL with a task store: ``store``, else a SQLite file of the test's
    own, or the test Redis when ``CONVEYOR_TEST_RABBITMQ_STORE=redis`` (the suite then runs
    the RabbitMQ backend over the Redis task store)."""
    if store is None:
        kind = os.environ.get("CONVEYOR_TEST_RABBITMQ_STORE", "sqlite")
        if kind == "postgres":
            store = session_postgres_database()
        else:
            store = REDIS_URL if kind == "redis" else f"sqlite:///{tmp_path}/store.db"
    separator = "&" if "?" in RABBITMQ_URL else "?"
    return f"{RABBITMQ_URL}{separator}task_store={store}"


def delete_rabbitmq_queues(queue_name: str) -> None:
    """Delete the broker queues of a Conveyor queue (teardown: leave the broker clean)."""
    import pika

    try:
        connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    except pika.exceptions.AMQPError:
        return
    try:
        channel = connection.channel()
        for name in (f"conveyor.{queue_name}", f"conveyor.{queue_name}.dead"):
            channel.queue_delete(name)
    except pika.exceptions.AMQPError:
        pass
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()


def rabbitmqctl_rows(listing: str, *columns: str) -> list[list[str]]:
    """``rabbitmqctl <listing> <columns>`` on the test broker, one list of fields per row
    (e.g. ``rabbitmqctl_rows("list_queues", "name", "messages_unacknowledged")``)."""
    listed = subprocess.run(
        ["rabbitmqctl", listing, *columns, "-q", "--no-table-headers"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [line.split("\t", len(columns) - 1) for line in listed.stdout.splitlines() if line]


def close_rabbitmq_connection(manager: QueueManager) -> None:
    """Have the broker close one manager's connection (a real fault: its deliveries are
    requeued), found by the ``connection_name`` the backend gives it."""
    name = manager.server.link.name  # type: ignore[attr-defined]  # a RabbitMQServer
    pids = [
        pid
        for pid, properties in rabbitmqctl_rows("list_connections", "pid", "client_properties")
        if f'{{"connection_name","{name}"}}' in properties
    ]
    assert pids, f"the broker lists no connection named {name!r}"
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "closed by a test"],
            capture_output=True,
            timeout=60,
            check=True,
        )


def _url_for(name: str, tmp_path: Path) -> str:
    if name == "sqlite":
        return f"sqlite:///{tmp_path}/q.db"
    if name == "redis":
        return REDIS_URL
    if name == "rabbitmq":
        return rabbitmq_url(tmp_path)
    if name == "rabbitmq-redis":
        return rabbitmq_url(tmp_path, REDIS_URL)
    raise AssertionError(f"no URL known for backend {name!r}")


@pytest.fixture(params=backend_params())
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend under test; a test module may parametrize it directly to narrow the set."""
    return str(request.param)


@pytest.fixture
def backend_url(backend_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A URL for the backend under test, checked to be usable (or skipped / failed)."""
    require_backend_module(backend_name.split("-", 1)[0])
    if backend_name in ("redis", "rabbitmq-redis"):
        require_redis_server()
    if backend_name in ("rabbitmq", "rabbitmq-redis"):
        require_rabbitmq_server()
    if backend_name == "redis-cluster":
        cluster: PrivateCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    if backend_name == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return _url_for(backend_name, tmp_path)


@pytest.fixture
def queue_name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_queue(backend_url: str, queue_name: str) -> Iterator[Callable[..., QueueManager]]:
    """Factory: ``make_queue(**options)`` opens another manager on the test's queue.

    Every manager it made is cleared and closed at teardown, so the shared Redis is left
    clean; on Redis any key of the queue that ``clear()`` left behind is deleted too, and on
    RabbitMQ the queue's broker queues.
    """
    made: list[QueueManager] = []

    def factory(**options: Any) -> QueueManager:
        options.setdefault("queue_name", queue_name)
        manager = QueueManager.from_url(backend_url, **options)
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        with contextlib.suppress(Exception):
            manager.clear()
        with contextlib.suppress(Exception):
            manager.close()
    if is_redis(backend_url):
        _delete_redis_keys(backend_url, queue_name)
    if backend_url.startswith("amqp") and f"task_store={REDIS_URL}" in backend_url:
        _delete_redis_keys(REDIS_URL, queue_name)
    if backend_url.startswith("amqp"):
        delete_rabbitmq_queues(queue_name)


def _delete_redis_keys(url: str, queue_name: str) -> None:
    import redis

    client = redis_admin(url, decode=False)
    try:
        keys = list(client.scan_iter(match=f"conveyor:{{{queue_name}}}:*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
    finally:
        client.close()


@pytest.fixture
def queue(make_queue: Callable[..., QueueManager]) -> QueueManager:
    """A manager with default options on the test's queue."""
    return make_queue()


# -- polling --------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError naming ``message`` after ``timeout`` seconds. This is the only way
    tests wait for something to happen: never a bare sleep as synchronisation.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {text}")
        time.sleep(interval)


def sleep_until(wall_clock: float) -> None:
    """Let time pass until ``time.time()`` reaches ``wall_clock`` (for lease/delay expiry)."""
    remaining = wall_clock - time.time()
    if remaining > 0:
        time.sleep(remaining)


# -- helper subprocesses --------------------------------------------------------------------


class Helper:
    """A helper script from ``tests/helpers`` running in its own process.

    stdout is read line by line on a thread so the test can wait for a line with a deadline;
    stderr goes to a file that is shown when an expectation fails.
    """

    def __init__(self, script: str, args: list[str], log_dir: Path) -> None:
        self.name = f"{Path(script).name}-{uuid.uuid4().hex[:6]}"  # a path must not escape log_dir
        self.stderr_path = log_dir / f"{self.name}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPERS / script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self.lines: queue_module.Queue[str | None] = queue_module.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def expect(self, prefix: str, timeout: float = 15.0) -> str:
        """Wait for the next stdout line starting with ``prefix``; return its remainder."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.001))
            except queue_module.Empty:
                line = ""
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.name}: no line {prefix!r} within {timeout}s; stderr:\n"
                        f"{self.stderr()}"
                    ) from None
                continue
            if line is None:
                raise AssertionError(
                    f"{self.name} exited ({self.proc.wait()}) before printing {prefix!r}; "
                    f"stderr:\n{self.stderr()}"
                )
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout}s; stderr:\n{self.stderr()}"
            ) from None

    def stop(self) -> None:
        """Kill the process if it still runs (SIGCONT first in case it was stopped), reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.close()
        self._stderr.close()


@pytest.fixture
def spawn_helper(tmp_path: Path) -> Iterator[Callable[..., Helper]]:
    """Factory: ``spawn_helper("consumer.py", "--url", url, ...)``; all are reaped at teardown."""
    started: list[Helper] = []

    def factory(script: str, *args: str) -> Helper:
        helper = Helper(script, list(args), tmp_path)
        started.append(helper)
        return helper

    yield factory
    for helper in started:
        helper.stop()


# -- servers a test may break (outage tests) ------------------------------------------------


@pytest.fixture(scope="session")
def private_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of this test run's own (``helpers.private_rabbitmq``), started once
    per session on free ports (2-4 s here, 10-20 s on a slow machine) and stopped at the
    end. Tests take it through ``rabbitmq_node``, which restarts the app if a test left it
    stopped. Use ``node.amqp_url("task_store=sqlite:///...")``, ``node.stop_app()``,
    ``node.start_app()``."""
    if not rabbitmq_installed():
        unavailable("rabbitmq-server is not installed")
    node = PrivateRabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    try:
        node.start()
    except BaseException:
        node.stop()
        raise
    yield node
    node.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    """A Redis Cluster of this test run's own (``helpers.private_cluster``): 3 masters and
    3 replicas on free loopback ports, started once per session (about 7 s) and stopped at
    the end. A test that kills a node calls ``heal()`` before it ends, so the next test
    finds the cluster whole again."""
    _require_redis_binaries()
    cluster = PrivateCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateSentinel]:
    """A master, its replica and three sentinels of this test run's own, with passwords on
    the master and the sentinels (``helpers.private_cluster.PrivateSentinel``)."""
    _require_redis_binaries()
    setup = PrivateSentinel(tmp_path_factory.mktemp("sentinel"))
    try:
        setup.start()
    except BaseException:
        setup.stop()
        raise
    yield setup
    setup.stop()


def _require_redis_binaries() -> None:
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            unavailable(f"{binary} is not installed")


@pytest.fixture
def rabbitmq_node(private_rabbitmq: PrivateRabbitMQ) -> PrivateRabbitMQ:
    """The session's private RabbitMQ node, its app running (a ``PrivateRabbitMQ``)."""
    private_rabbitmq.ensure_running()
    return private_rabbitmq


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    """Factory: ``private_redis(aof=True, password=None, start=True, *args)`` gives a
    ``helpers.private_redis.PrivateRedis`` in the test's tmp dir (10-50 ms to start) that
    the test may ``kill()``, ``start()`` again on the same port, ``pause()``/``resume()``;
    all are killed at teardown."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    started: list[PrivateRedis] = []

    def start(*args: str, **options: Any) -> PrivateRedis:
        server = PrivateRedis(tmp_path / f"redis{len(started)}", *args, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[int], TcpProxy]]:
    """Factory: ``tcp_proxy(broker_port)`` gives a ``helpers.tcp_proxy.TcpProxy`` on a free
    port (``.port``) with ``drop()``, ``blackhole()``, ``reject()``, ``restore()``; all are
    closed at teardown."""
    made: list[TcpProxy] = []

    def make(port: int) -> TcpProxy:
        proxy = TcpProxy(port)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``worker_process(url, *args, env={...})`` starts ``conveyor worker`` (a
    ``helpers.worker_process.WorkerProcess``: ``wait_for(text)``, ``signal()``, ``wait()``)
    on the ``ops_pipeline``; all are killed at teardown."""
    started: list[WorkerProcess] = []

    def start(url: str, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(tmp_path / f"worker{len(started)}", url, *args, env=env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()
