"""The Redis backend: one sorted set per queue, leases with fencing tokens, Lua for atomicity.

Each operation is one Lua script (``redis_lua/*.lua``, loaded once and called by SHA), so a
task is always in exactly one index — pending, delayed, leases or a done set — and never
only in a worker's memory. All keys of a queue share the hash tag ``{queue}`` and reach the
scripts through KEYS, so the same scripts run on Redis Cluster.

A blocked reserve waits on ``BLPOP`` of a wake-up list that every push appends to, bounded
by how long until a delayed task is due or a lease expires, so it wakes within a round trip
of a push without polling.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

import redis
from loguru import logger
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError

from ..errors import BackendError, BrokerAuthenticationError, BrokerUnavailableError
from ..models import FINISHED_STATUSES, TaskStatus
from ..urls import mask_url
from .base import Backend, Claimed, ClaimResult, NewTask

_SCRIPTS = (
    "enqueue", "claim", "ack", "nack", "fail", "extend", "progress", "checkpoint", "cancel",
    "retry", "purge",
)  # fmt: skip
#: The worker registry spans queues, so it lives outside any queue's hash tag.
_WORKERS = "conveyor:workers"
_STOP_ALL = "conveyor:workers:stop-all"
#: Names of the queues opened on this server, for ``conveyor queues`` (outside any hash tag).
_QUEUES = "conveyor:queues"
_INCLUDE = re.compile(r"^-- @include (\S+)$", re.MULTILINE)
#: Longest single BLPOP: the socket timeout below must stay above it.
_MAX_BLOCK = 5.0
#: Successes sampled for the mean run time in ``recent`` (keeps stats() cheap on busy queues).
_RUNTIME_SAMPLE = 1000
#: Servers already checked for persistence in this process: warn once, not per manager.
_checked_servers: set[str] = set()


def _load_script(name: str) -> str:
    """Read one script and expand its ``-- @include`` lines (static files only)."""
    folder = resources.files("conveyor.backends") / "redis_lua"
    source = (folder / f"{name}.lua").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda match: (folder / match.group(1)).read_text(encoding="utf-8"), source)


def _wire(value: Any) -> Any:
    """Text as redis-py sends it, keeping ids that came back from Redis undamaged.

    Replies are decoded with ``surrogateescape`` so a binary id someone wrote by hand
    survives a round trip; the hiredis packer ignores ``encoding_errors``, so such text is
    turned back into its original bytes here.
    """
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "surrogateescape")
    return value


class RedisBackend(Backend):
    """Tasks of one queue in Redis. See ``backends.base`` for each primitive's contract."""

    def __init__(
        self,
        url: str,
        queue_name: str,
        *,
        connect_timeout: float = 5.0,
        result_ttl: float = 7 * 24 * 3600,
    ) -> None:
        self.safe_url = mask_url(url)
        self.queue_name = queue_name
        self._ttl = str(result_ttl)
        tag = f"conveyor:{{{queue_name}}}"
        self._prefix = f"{tag}:task:"
        self._keys = (
            f"{tag}:pending",
            f"{tag}:delayed",
            f"{tag}:leases",
            self._prefix,
            f"{tag}:seq",
            f"{tag}:wake",
            f"{tag}:done:success",
            f"{tag}:done:failed",
            f"{tag}:done:canceled",
            f"{tag}:done:timeout",
            f"{tag}:pulled",
        )
        self._call_head = (len(self._keys), *self._keys, queue_name, self._ttl)
        # A server that accepts but never answers must fail within about connect_timeout
        # too; blocking waits stay a second shorter than this so they never trip it.
        self._socket_timeout = max(2.0 * connect_timeout, 3.0)
        self._max_block = min(_MAX_BLOCK, self._socket_timeout - 1.0)
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                url,
                decode_responses=True,
                encoding_errors="surrogateescape",
                socket_connect_timeout=connect_timeout,
                socket_timeout=self._socket_timeout,
                health_check_interval=30,
            )
        except ValueError as exc:
            raise BrokerUnavailableError(f"bad Redis URL {self.safe_url}: {exc}") from None
        self._sha: dict[str, str] = {}
        self._source = {name: _load_script(name) for name in _SCRIPTS}
        with self._translate():
            self._client.ping()
            self._load_scripts()
            self._client.sadd(_QUEUES, queue_name)
        self._warn_if_unsafe()

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """Driver errors become conveyor errors here; nothing above imports redis."""
        try:
            yield
        except AuthenticationError as exc:
            raise BrokerAuthenticationError(
                f"Redis at {self.safe_url} refused the credentials ({exc}); "
                "check the password in the URL or REDIS_URL"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerUnavailableError(
                f"cannot reach Redis at {self.safe_url}: {exc}. Is redis-server running "
                "there? Check the URL (--url, CONVEYOR_URL or REDIS_URL)"
            ) from None
        except ResponseError as exc:
            if str(exc).startswith(("WRONGPASS", "NOAUTH")):
                raise BrokerAuthenticationError(
                    f"Redis at {self.safe_url} refused the credentials ({exc}); "
                    "check the password in the URL or REDIS_URL"
                ) from None
            raise BackendError(f"Redis at {self.safe_url} answered with an error: {exc}") from None

    def _load_scripts(self) -> None:
        for name, source in self._source.items():
            self._sha[name] = str(self._client.script_load(source))

    def _run(self, name: str, *args: Any) -> Any:
        """Call a script by SHA; after a server restart or SCRIPT FLUSH, load and retry once."""
        args = tuple(_wire(arg) for arg in args)
        with self._translate():
            try:
                return self._client.evalsha(self._sha[name], *self._call_head, *args)
            except NoScriptError:
                self._load_scripts()
                return self._client.evalsha(self._sha[name], *self._call_head, *args)

    def _warn_if_unsafe(self) -> None:
        """Say at start when this server would lose acknowledged tasks (RELIABILITY.md)."""
        if self.safe_url in _checked_servers:
            return
        _checked_servers.add(self.safe_url)
        try:
            config = self._client.config_get("appendonly")
            config.update(self._client.config_get("maxmemory-policy"))
        except (ResponseError, redis.RedisError):
            return  # CONFIG is often disabled on managed Redis: nothing to check
        if config.get("appendonly") != "yes":
            logger.warning(
                "Redis at {} has appendonly=no: a restart loses queued tasks. Set "
                "'appendonly yes' and 'appendfsync everysec' for production",
                self.safe_url,
            )
        policy = config.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            logger.warning(
                "Redis at {} has maxmemory-policy={}: under memory pressure it evicts keys, "
                "tasks included. Set 'maxmemory-policy noeviction'",
                self.safe_url,
                policy,
            )

    @staticmethod
    def _claim_result(reply: list[Any]) -> ClaimResult:
        if int(reply[0]) == 0:
            hint = float(reply[1])
            return ClaimResult(None, None if hint < 0 else hint)
        (
            _,
            task_id,
            token,
            attempts,
            priority,
            data,
            type_,
            retries,
            backoff,
            limit,
            created,
            steps,
        ) = reply
        return ClaimResult(
            Claimed(
                task_id=task_id,
                token=token,
                attempts=int(attempts),
                priority=priority,
                data_json=data,
                type=type_ or None,
                max_retries=retries or None,
                retry_backoff=backoff or None,
                process_timeout=limit or None,
                created_at=created or None,
                steps_json=steps or None,
            )
        )

    # -- the primitives ---------------------------------------------------------------------

    def enqueue(self, tasks: Sequence[NewTask]) -> list[bool]:
        args: list[Any] = []
        for task in tasks:
            args += (
                task.task_id,
                task.priority,
                task.data_json,
                task.type or "",
                task.delay,
                "" if task.max_retries is None else task.max_retries,
                "" if task.retry_backoff is None else task.retry_backoff,
                "" if task.queue_timeout is None else task.queue_timeout,
                "" if task.process_timeout is None else task.process_timeout,
            )
        return [bool(flag) for flag in self._run("enqueue", *args)]

    def claim(
        self, lease_seconds: float | None, max_deliveries: int, *, consumer: str = ""
    ) -> ClaimResult:
        lease = "" if lease_seconds is None else lease_seconds
        token = uuid.uuid4().hex
        return self._claim_result(self._run("claim", lease, max_deliveries, token, consumer))

    def wait(self, timeout: float) -> None:
        with self._translate():
            self._client.blpop([self._keys[5]], timeout=min(max(timeout, 0.001), self._max_block))

    def ack(self, task_id: str, token: str, result_json: str | None) -> bool:
        return bool(self._run("ack", task_id, token, result_json or "", "0")[0])

    def ack_and_claim(
        self,
        task_id: str,
        token: str,
        result_json: str | None,
        lease_seconds: float,
        max_deliveries: int,
        *,
        consumer: str = "",
    ) -> tuple[bool, ClaimResult]:
        reply = self._run(
            "ack",
            task_id,
            token,
            result_json or "",
            "1",
            lease_seconds,
            max_deliveries,
            uuid.uuid4().hex,
            consumer,
        )
        return bool(reply[0]), self._claim_result(reply[1])

    def nack(
        self, task_id: str, token: str, delay: float, error_json: str | None, count_attempt: bool
    ) -> bool:
        return bool(
            self._run(
                "nack", task_id, token, delay, error_json or "", "1" if count_attempt else "0"
            )
        )

    def fail(
        self,
        task_id: str,
        token: str | None,
        reason: str,
        error_json: str | None,
        *,
        status: str = "failed",
    ) -> bool:
        return bool(self._run("fail", task_id, token or "", reason, error_json or "", status))

    def checkpoint(self, task_id: str, token: str, steps_json: str) -> bool:
        return bool(self._run("checkpoint", task_id, token, steps_json))

    def extend(self, task_id: str, token: str, lease_seconds: float) -> bool:
        return bool(self._run("extend", task_id, token, lease_seconds))

    def set_progress(self, task_id: str, token: str, progress: float, message: str | None) -> bool:
        return bool(self._run("progress", task_id, token, progress, message or ""))

    def cancel(self, task_id: str) -> bool:
        return bool(self._run("cancel", task_id))

    def retry(self, task_id: str) -> bool:
        return bool(self._run("retry", task_id))

    def purge_finished(self, status: str, limit: int) -> int:
        return int(self._run("purge", status, limit))

    # -- reading ----------------------------------------------------------------------------

    def _index_key(self, status: str) -> str:
        by_status = {"pending": 0, "scheduled": 1, "processing": 2}
        if status in by_status:
            return self._keys[by_status[status]]
        return f"conveyor:{{{self.queue_name}}}:done:{status}"

    def _rows(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        pipe = self._client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(_wire(self._prefix + task_id))
        with self._translate():
            replies = pipe.execute(raise_on_error=False)
        rows = []
        for task_id, reply in zip(ids, replies, strict=True):
            if isinstance(reply, Exception):  # not a hash: garbage someone wrote by hand
                rows.append({"id": task_id, "status": "failed", "dead_reason": "malformed"})
            elif reply:
                rows.append({"id": task_id, **reply})
        return rows

    def get(self, task_id: str) -> dict[str, Any] | None:
        rows = self._rows([task_id])
        return rows[0] if rows else None

    def list(self, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        if limit == 0:
            return []
        if status is not None:
            key, stop = self._index_key(status), offset + limit - 1
            with self._translate():
                if status == "processing":  # leased first, then pulled (at-most-once) ones
                    ids = self._client.zrange(key, 0, stop) + self._client.zrange(
                        self._keys[10], 0, stop
                    )
                    ids = ids[offset : offset + limit]
                elif status in ("pending", "scheduled"):
                    ids = self._client.zrange(key, offset, stop)
                else:
                    ids = self._client.zrevrange(key, offset, stop)
            return self._rows([str(task_id) for task_id in ids])
        rows = []
        for each in TaskStatus:
            rows += self.list(each.value, offset + limit, 0)
        rows.sort(key=lambda row: float(row.get("updated_at") or 0), reverse=True)
        return rows[offset : offset + limit]

    def counts(self) -> dict[str, int]:
        pipe = self._client.pipeline(transaction=False)
        for status in TaskStatus:
            pipe.zcard(self._index_key(status.value))
        pipe.zcard(self._keys[10])
        with self._translate():
            *replies, pulled = pipe.execute()
        counts = {status.value: int(n) for status, n in zip(TaskStatus, replies, strict=True)}
        counts[TaskStatus.PROCESSING.value] += int(pulled)
        return counts

    def recent(self, seconds: float) -> tuple[int, int, float | None]:
        with self._translate():
            now_s, now_us = self._client.time()
            since = now_s + now_us / 1e6 - seconds
            pipe = self._client.pipeline(transaction=False)
            pipe.zcount(self._index_key("success"), since, "+inf")
            pipe.zcount(self._index_key("failed"), since, "+inf")
            pipe.zrevrangebyscore(self._index_key("success"), "+inf", since, 0, _RUNTIME_SAMPLE)
            done, failed, ids = pipe.execute()
            pipe = self._client.pipeline(transaction=False)
            for task_id in ids:
                pipe.hmget(self._prefix + task_id, "started_at", "finished_at")
            times = pipe.execute(raise_on_error=False)
        runs = [
            float(end) - float(start)
            for start, end in (t for t in times if isinstance(t, list))
            if start and end
        ]
        return int(done), int(failed), (sum(runs) / len(runs) if runs else None)

    def size(self) -> int:
        with self._translate():
            return int(self._client.zcard(self._keys[0]))

    def purge(self) -> int:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", f"conveyor:{{{self.queue_name}}}:") + "*"
        with self._translate():
            pending = int(self._client.zcard(self._keys[0]))
            batch: list[str] = []
            for key in self._client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    self._client.unlink(*batch)
                    batch.clear()
            if batch:
                self._client.unlink(*batch)
            self._client.srem(_QUEUES, self.queue_name)
        return pending

    def known_queues(self) -> Sequence[str]:
        with self._translate():
            return sorted(str(name) for name in self._client.smembers(_QUEUES))

    # -- the worker registry ----------------------------------------------------------------

    def register_worker(self, worker_id: str, info_json: str, ttl: float) -> bool:
        with self._translate():
            now_s, now_us = self._client.time()
            now = now_s + now_us / 1e6
            pipe = self._client.pipeline(transaction=False)
            pipe.set(f"{_WORKERS}:{worker_id}", info_json, px=int(ttl * 1000))
            pipe.zadd(_WORKERS, {worker_id: now})
            pipe.zremrangebyscore(_WORKERS, "-inf", now - ttl)
            pipe.get(f"{_WORKERS}:{worker_id}:stop")
            pipe.get(_STOP_ALL)
            *_, stop_one, stop_all = pipe.execute()
        started = float(json.loads(info_json).get("started_at", 0))
        return stop_one is not None or (stop_all is not None and float(stop_all) >= started)

    def unregister_worker(self, worker_id: str) -> None:
        with self._translate():
            pipe = self._client.pipeline(transaction=False)
            pipe.zrem(_WORKERS, worker_id)
            pipe.delete(f"{_WORKERS}:{worker_id}", f"{_WORKERS}:{worker_id}:stop")
            pipe.execute()

    def list_workers(self) -> Sequence[str]:
        with self._translate():
            ids = self._client.zrange(_WORKERS, 0, -1)
            pipe = self._client.pipeline(transaction=False)
            for worker_id in ids:
                pipe.get(f"{_WORKERS}:{worker_id!s}")
            return [str(info) for info in pipe.execute() if info]

    def request_stop(self, worker_id: str | None) -> int:
        with self._translate():
            if worker_id is None:
                now_s, now_us = self._client.time()
                self._client.set(_STOP_ALL, now_s + now_us / 1e6, ex=24 * 3600)
                return len(self.list_workers())
            if not self._client.exists(f"{_WORKERS}:{worker_id}"):
                return 0
            self._client.set(f"{_WORKERS}:{worker_id}:stop", "1", ex=24 * 3600)
            return 1

    def ping(self) -> None:
        with self._translate():
            self._client.ping()

    def close(self) -> None:
        self._client.close()


# Finished statuses are the ones with a done index; kept here so a new status fails loudly.
assert {status.value for status in FINISHED_STATUSES} == {
    "success",
    "failed",
    "canceled",
    "timeout",
}
