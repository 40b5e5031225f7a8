"""The Redis connection of one server, its error translation, and the Lua scripts.

Scripts live in ``lua/``, one per operation, each opening with a header that names its
ARGV; its ``-- @include _lifecycle.lua`` line stands for the transitions, which come after
the constants generated from ``conveyor.lifecycle``. On Redis 7 and later they are loaded
once per server as one function library (``library``) and called with FCALL: the
lifecycle's ~150 functions and tables are then built once at load, not on every call as
EVALSHA does (that rebuilding was about 40 µs of server time per call, a third of a
settle). A server without FUNCTION (Redis 6, or an ACL that forbids it) gets them as
scripts called by SHA. After a server restart, a failover or a flush (``Function not
found``, NOSCRIPT) they are loaded again and the call is retried once.

The client is a plain ``redis.Redis`` for one server or a Sentinel's master, and a
``RedisCluster`` for a cluster (``target``). On Cluster and Sentinel every call rides out
a failover: a refused connection, a cluster that is down or a master that became a
replica is retried with a backoff, the slot map or master address refreshed by redis-py,
for up to ``failover_timeout`` seconds before the call reports the backend unavailable.
Retrying is safe because every write is a script guarded by a fencing token or a task id:
run twice, the second run is refused (an ack), or stores nothing new (a push of a live id).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from typing import Any, TypeVar

import redis
from hiredis import pack_command
from loguru import logger
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)

from ...durability import parse_durability
from ...errors import BackendError, BrokerAuthenticationError, BrokerUnavailableError
from .library import Library, build_library
from .target import RedisTarget, connect, parse_target

T = TypeVar("T")
#: Longest single BLPOP: the socket timeout stays above it.
MAX_BLOCK = 5.0
#: Backoff between retries while a failover is under way: doubling up to the cap.
_FIRST_RETRY, _MAX_RETRY = 0.05, 1.0
#: TCP keepalive on every connection: a peer that vanished (a host down, a partition) is
#: noticed on an idle connection after about 5 + 3 x 2 = 11 s, not the kernel's two hours.
#: A server that is up but does not answer (SIGSTOP) is caught by ``socket_timeout`` instead.
KEEPALIVE = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None
}
#: Servers already checked for persistence in this process: warn once, not per manager.
_checked_servers: set[str] = set()


#: Every live client, so that a forked child drops the connection it inherited (below).
_clients: weakref.WeakSet[RedisClient] = weakref.WeakSet()


def _forget_inherited_connections() -> None:
    """In a forked child: a kept connection's socket is the parent's, and a read or write
    on it would mix the two processes' replies. Drop it (never close: the socket stays the
    parent's); the child connects anew at its first call. redis-py's pools do the same by
    their own pid check."""
    for client in list(_clients):
        client._own = None
        client._own_lock = threading.Lock()  # a copy taken while another thread held it


os.register_at_fork(after_in_child=_forget_inherited_connections)


def _refuses_functions(exc: ResponseError) -> bool:
    """FUNCTION is unknown (Redis before 7) or forbidden (an ACL): use scripts instead.
    Any other error (out of memory, busy, read-only) is a passing state of the server."""
    if isinstance(exc, NoPermissionError):  # redis-py strips the NOPERM prefix
        return True
    text = str(exc).lower()
    return "unknown command" in text or "unknown subcommand" in text


def _missing(reply: Any) -> bool:
    """The server no longer has our scripts or library (restarted, failed over, flushed)."""
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, ResponseError) and "Function not found" in str(reply)
    )


def _unpooled(pool: Any) -> Any:
    """A connection made as ``pool`` makes one (Sentinel's finds the master), but not
    counted against its ``max_connections``: it is never returned to it."""
    return pool.connection_class(**pool.connection_kwargs)


def _ready(conn: Any) -> None:
    """Check a kept connection as the pool checks one it hands out: connected, and with
    nothing to read. Readable means the server closed it (a restart) or a stale reply: then
    connect again, so the first call after a restart does not fail for an old socket."""
    conn.connect()  # a no-op when connected; a server that is down fails here, once
    try:
        if conn.can_read():
            raise redis.ConnectionError("connection has unread data")
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        conn.disconnect()
        conn.connect()


def _round_trip(conn: Any, command: tuple[Any, ...]) -> Any:
    """Send one command on ``conn`` and read its reply (an error reply is raised)."""
    try:
        conn.send_packed_command([pack_command(command)])
        return conn.read_response()
    except (redis.ConnectionError, redis.TimeoutError):
        conn.disconnect()
        raise


class NoMasterError(BrokerUnavailableError):
    """No master answers for now; on Cluster or Sentinel, a failover may be under way."""


def wire(value: Any) -> Any:
    """Text as redis-py sends it, keeping ids that came back from Redis undamaged.

    Replies are decoded with ``surrogateescape`` so a binary id someone wrote by hand
    survives a round trip; the hiredis packer ignores ``encoding_errors``, so such text is
    turned back into its original bytes here.
    """
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "surrogateescape")
    return value


class RedisClient:
    """A redis-py client with Conveyor's error translation, failover retries and scripts."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        durability: str | None = None,
        functions: bool = True,
    ) -> None:
        self.target: RedisTarget = parse_target(url)
        if durability is not None:  # the setting beats the URL parameter
            self.target = replace(self.target, durability=parse_durability(durability))
        self.safe_url = self.target.safe_url
        self.durability = self.target.durability
        # A server that accepts but never answers (paused, or a black-holed connection)
        # must fail within seconds too: 2 x connect_timeout, at least 3 s. Blocking waits
        # stay a second shorter than this so they never trip it. No retries inside
        # redis-py: one failed call is reported at once, and the caller (a worker riding
        # out an outage, or the failover retry below) decides when to try again.
        socket_timeout = max(2.0 * connect_timeout, 3.0)
        self.max_block = min(MAX_BLOCK, socket_timeout - 1.0)
        with self.translate():
            self.redis: Any = connect(
                self.target,
                decode_responses=True,
                encoding_errors="surrogateescape",
                socket_connect_timeout=connect_timeout,
                socket_timeout=socket_timeout,
                socket_keepalive=True,
                socket_keepalive_options=KEEPALIVE,
                health_check_interval=30,
            )
        #: The same client when it is a RedisCluster (untyped in redis-py), else None.
        self.cluster: Any = self.redis if isinstance(self.redis, RedisCluster) else None
        self._library: Library = build_library()
        #: FCALL when the server takes the library; False forever once it refused FUNCTION.
        self._functions = functions
        self._sha: dict[str, str] = {}
        #: The connection ``_call`` uses when no other thread does (see there).
        self._own: Any = None
        self._own_lock = threading.Lock()
        _clients.add(self)
        self._slots: dict[str, int] = {}  # cluster: key -> slot, for the keys on_master sees
        with self.translate():  # at start: fail fast, the worker's start-up waits and retries
            self.redis.ping()
            self._load_scripts()
        self._warn_if_unsafe()

    # -- errors and retries -------------------------------------------------------------------

    @contextmanager
    def translate(self) -> Iterator[None]:
        """Driver errors become conveyor errors here; nothing above imports redis."""
        try:
            yield
        except AuthenticationError as exc:
            raise BrokerAuthenticationError(
                f"Redis at {self.safe_url} refused the credentials ({exc}); "
                "check the password in the URL or REDIS_URL"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise NoMasterError(
                f"cannot reach Redis at {self.safe_url}: {exc}. Is redis-server running "
                "there? Check the URL (--url, CONVEYOR_URL or REDIS_URL)"
            ) from None
        except (ClusterDownError, TryAgainError, ReadOnlyError, AskError) as exc:
            # AskError covers MovedError: only calls on a node's own connection (on_master)
            # see them; RedisCluster follows redirects itself. An ASK (a slot being moved
            # by resharding) is retried until the move is done.
            if not self.target.high_availability:
                raise BackendError(f"Redis at {self.safe_url} answered: {exc}") from None
            raise NoMasterError(
                f"Redis at {self.safe_url} has no master for this key yet ({exc}); "
                "a failover or resharding is under way"
            ) from None
        except RedisClusterException as exc:
            text = str(exc)
            if (
                isinstance(exc, SlotNotCoveredError)
                or "cannot be connected" in text
                or ("not covered" in text)
            ):  # no node answers, or not every slot has a master yet: a failover
                raise NoMasterError(f"Redis Cluster at {self.safe_url}: {text}") from None
            raise BackendError(f"Redis Cluster at {self.safe_url}: {text}") from None
        except ResponseError as exc:
            text = str(exc)
            if text.startswith(("WRONGPASS", "NOAUTH", "NOPERM")):
                raise BrokerAuthenticationError(
                    f"Redis at {self.safe_url} refused the credentials ({text}); "
                    "check the user and password in the URL or REDIS_URL"
                ) from None
            raise BackendError(f"Redis at {self.safe_url} answered with an error: {text}") from None

    def call(self, action: Callable[[], T]) -> T:
        """Run ``action`` (redis-py calls) with errors translated; on Cluster and Sentinel,
        retry it while a failover is under way, for up to ``failover_timeout`` seconds."""
        deadline: float | None = None
        pause = _FIRST_RETRY
        while True:
            try:
                with self.translate():
                    return action()
            except NoMasterError as exc:
                if not self.target.high_availability:
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.target.failover_timeout
                    logger.warning("{}; retrying for up to {:g}s (failover_timeout)",
                                   exc, self.target.failover_timeout)  # fmt: skip
                if now + pause > deadline:
                    raise NoMasterError(
                        f"{exc} (still after {self.target.failover_timeout:g}s of retrying; "
                        "raise failover_timeout if your failovers take longer)"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, _MAX_RETRY)

    # -- scripts --------------------------------------------------------------------------------

    def _load_scripts(self) -> None:
        if self._functions:
            try:
                self._load_library()
                return
            except ResponseError as exc:
                if not _refuses_functions(exc):
                    raise
                logger.info("Redis at {} does not take function libraries ({}); using "
                            "scripts (EVALSHA) instead", self.safe_url, exc)  # fmt: skip
        # RedisCluster: on every master. All SHAs are known before the switch, so no call
        # ever looks up a script that is not loaded.
        self._sha = {
            name: str(self.redis.script_load(source))
            for name, source in self._library.scripts.items()
        }
        self._functions = False

    def _load_library(self) -> None:
        """FUNCTION LOAD on every master; a library of the same name holds the same code
        (the name carries its digest), so one that exists is left as it is."""
        nodes = (
            [self.redis]
            if self.cluster is None
            else [self.cluster.get_redis_connection(n) for n in self.cluster.get_primaries()]
        )
        for node in nodes:
            try:
                node.function_load(self._library.code)
            except ResponseError as exc:
                if "already exists" not in str(exc):
                    raise

    def _invoke(self, target: Any, name: str, keys: Sequence[str], argv: Sequence[Any]) -> Any:
        """One call of operation ``name`` on a node or a pipeline."""
        if self._functions:
            return target.fcall(self._library.functions[name], len(keys), *keys, *argv)
        return target.evalsha(self._sha[name], len(keys), *keys, *argv)

    def _call(self, node: Any, name: str, keys: Sequence[str], argv: Sequence[Any]) -> Any:
        """One call, the command packed by hiredis and sent on a connection directly.

        redis-py's per-command layers (retry wrapper, metrics recorder, event dispatch,
        reply callbacks, and the pool's bookkeeping on every checkout) cost about as much
        CPU as the worker's own work per task, and none of them applies here: no retries,
        no callback for FCALL. The server's own client keeps one connection for these
        calls (the worker's loop makes one per task); a thread that finds it in use (the
        upkeep thread) takes one from the pool. A broken connection is closed, as redis-py
        does, and connects again at its next use.
        """
        if type(node) is not redis.Redis:  # RedisCluster (an ASK), or anything unexpected
            return self._invoke(node, name, keys, argv)
        if self._functions:
            command = ("FCALL", self._library.functions[name], len(keys), *keys, *argv)
        else:
            command = ("EVALSHA", self._sha[name], len(keys), *keys, *argv)
        if node is self.redis and self._own_lock.acquire(blocking=False):
            try:
                if self._own is None:
                    self._own = _unpooled(node.connection_pool)
                _ready(self._own)
                return _round_trip(self._own, command)
            finally:
                self._own_lock.release()
        pool = node.connection_pool
        conn: Any = pool.get_connection()
        try:
            return _round_trip(conn, command)
        finally:
            pool.release(conn)

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Call an operation on the master of its keys' slot; load the library (or scripts)
        again and retry once when the server has lost them."""
        argv = [wire(arg) for arg in args]

        def attempt(node: Any) -> Any:
            try:
                return self._call(node, name, keys, argv)
            except ResponseError as exc:  # a restarted server, or a replica that took over
                if not _missing(exc):
                    raise
                self._load_scripts()
                return self._call(node, name, keys, argv)

        return self.on_master(keys[0], attempt)

    def run_durable(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, int]:
        """Call a script, then ``WAIT`` for the replicas ``durability`` asks for, in one
        pipeline on one connection to the master of the keys' slot (WAIT has no key and
        counts only the writes of its own connection). Returns the script's reply and how
        many replicas confirmed the write.
        """
        durability = self.durability
        assert durability is not None
        argv = [wire(arg) for arg in args]

        def attempt(node: Any, asking: bool = False, reloaded: bool = False) -> tuple[Any, int]:
            pipe = node.pipeline(transaction=False)
            if asking:  # the slot is being migrated to this node: ASKING lets one command in
                pipe.execute_command("ASKING")
            self._invoke(pipe, name, keys, argv)
            pipe.execute_command("WAIT", durability.replicas, durability.timeout_ms)
            *_, reply, acked = pipe.execute(raise_on_error=False)
            if _missing(reply) and not reloaded:  # WAIT ran after nothing
                self._load_scripts()
                return attempt(node, asking, reloaded=True)
            for value in (reply, acked):
                if isinstance(value, Exception):
                    raise value
            return reply, int(acked)

        def ask(exc: AskError) -> tuple[Any, int]:
            target = self.cluster.get_node(host=exc.host, port=exc.port)
            if target is None:  # a node we do not know yet: learn the map, then retry
                self.cluster.nodes_manager.initialize()
                raise exc
            return attempt(self.cluster.get_redis_connection(target), asking=True)

        return self.on_master(keys[0], attempt, ask)

    def on_master(
        self, key: str, action: Callable[[Any], T], ask: Callable[[AskError], T] | None = None
    ) -> T:
        """Run ``action`` with a plain client of the master serving ``key``, retried through
        a failover like ``call``. For one server or Sentinel that is the client itself.

        On a cluster it is the node's own ``redis.Redis``: one connection per pipeline (what
        WAIT needs), and none of the ~0.2 ms of Python a ``RedisCluster`` call spends per
        command working out the slot of each key and its routing policy (profiled on
        ``ack_and_reserve``; the slot of ``key`` is worked out once). A MOVED reply or a dead node
        refreshes the slot map first, so the retry goes to the master that took the slot
        over; an ASK (a slot being migrated by resharding) goes to ``ask``, by default
        this one call through RedisCluster, which follows it.
        """

        def attempt() -> T:
            cluster = self.cluster
            if cluster is None:
                return action(self.redis)
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = int(cluster.keyslot(key))
            node = cluster.get_redis_connection(cluster.nodes_manager.get_node_from_slot(slot))
            try:
                return action(node)
            except (MovedError, redis.ConnectionError, redis.TimeoutError):
                with suppress(redis.RedisError, RedisClusterException):
                    cluster.nodes_manager.initialize()  # else the retry asks the dead node
                raise
            except AskError as exc:
                return ask(exc) if ask is not None else action(cluster)

        return self.call(attempt)

    def dedicated_connection(self, key: str) -> Any:
        """A new connection to the master serving ``key``, outside the pool: for a reply
        read later (see ``doorbell``), which a pooled connection must never be left with."""

        def make(node: Any) -> Any:
            conn = _unpooled(node.connection_pool)
            conn.connect()
            return conn

        with self.translate():
            return self.on_master(key, make)

    def now(self, key: str | None = None) -> float:
        """The server clock; with ``key``, the clock of the master that holds it (the
        clock that queue's scripts stamp their times with)."""
        if key is None:
            seconds, micros = self.call(self.redis.time)
        else:
            seconds, micros = self.on_master(key, lambda node: node.time())
        return float(seconds) + float(micros) / 1e6

    # -- start-up checks ------------------------------------------------------------------------

    def _warn_if_unsafe(self) -> None:
        """Say at start when this server would lose acknowledged tasks."""
        if self.safe_url in _checked_servers:
            return
        _checked_servers.add(self.safe_url)
        try:
            config = self._config("appendonly")
            config.update(self._config("maxmemory-policy"))
        except (redis.RedisError, RedisClusterException):
            return  # CONFIG is often disabled on managed Redis: nothing to check
        if "no" in config.get("appendonly", set()):
            logger.warning(
                "Redis at {} has appendonly=no: a restart loses queued tasks. Set "
                "'appendonly yes' and 'appendfsync everysec' for production",
                self.safe_url,
            )
        policies = config.get("maxmemory-policy", set()) - {"noeviction"}
        if policies:
            logger.warning(
                "Redis at {} has maxmemory-policy={}: under memory pressure it evicts keys, "
                "tasks included. Set 'maxmemory-policy noeviction'",
                self.safe_url,
                ",".join(sorted(policies)),
            )

    def _config(self, name: str) -> dict[str, set[str]]:
        """A setting as every master has it (one value for one server)."""
        if self.cluster is None:
            reply = self.redis.config_get(name)
            return {key: {str(value)} for key, value in reply.items()}
        found: dict[str, set[str]] = {}
        for node in self.cluster.get_primaries():
            reply = self.cluster.get_redis_connection(node).config_get(name)
            for key, value in reply.items():
                found.setdefault(str(key), set()).add(str(value))
        return found

    def close(self) -> None:
        with self._own_lock:
            own, self._own = self._own, None
        if own is not None:
            with suppress(redis.RedisError, OSError):
                own.disconnect()
        self.redis.close()
