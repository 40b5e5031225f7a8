"""Checks of the backend server: does it answer, and does it keep what it acknowledges."""

from __future__ import annotations

import os
from typing import Any

from ..backends import QueueBackend, backend_for_url, sqlite_path_from_url
from ..errors import ConveyorError
from ..manager import QueueManager
from ..pipeline import PipelineService
from ..settings import Settings
from ..urls import mask_url
from . import Finding

_NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p"})


def check_backend(settings: Settings) -> list[Finding]:
    """The first check: a backend that does not answer makes the others moot."""
    url = settings.backend_url()
    safe = mask_url(url)
    try:
        with QueueManager.from_settings(settings) as queue:
            queue.ping()
    except ConveyorError as exc:
        return [
            Finding(
                "backend",
                "problem",
                f"{safe} does not answer: {_one_line(str(exc))}",
                "start the server, or point --url / CONVEYOR_URL / REDIS_URL at the one "
                "the workers use",
            )
        ]
    findings = [Finding("backend", "ok", f"{safe} answers")]
    if backend_for_url(url) is QueueBackend.SQLITE:
        findings += _check_sqlite_disk(sqlite_path_from_url(url))
    return findings


def _check_sqlite_disk(path: str) -> list[Finding]:
    """WAL needs shared memory between processes: a network filesystem corrupts it."""
    fstype = _filesystem_of(os.path.abspath(path))
    if fstype is None:
        return []
    if fstype in _NETWORK_FILESYSTEMS:
        return [
            Finding(
                "sqlite disk",
                "problem",
                f"{path} is on a {fstype} network filesystem, where SQLite's WAL mode "
                "is unsafe (locks and shared memory do not work across hosts)",
                "keep the database on a local disk (sqlite.path), or use Redis",
            )
        ]
    return [Finding("sqlite disk", "ok", f"{path} is on a local {fstype} filesystem")]


def _filesystem_of(path: str) -> str | None:
    """The type of the filesystem holding ``path``, from /proc/self/mounts (Linux)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return None
    best, found = -1, None
    for entry in entries:
        if len(entry) >= 3:
            point = entry[1].replace("\\040", " ")
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) > best:
                best, found = len(point), entry[2]
    return found


def check_redis(settings: Settings) -> list[Finding]:
    """``appendonly``, ``appendfsync`` and ``maxmemory-policy`` read with CONFIG GET."""
    url = settings.backend_url()
    if backend_for_url(url) is not QueueBackend.REDIS:
        return []
    config = _redis_config(url, settings.queue.connect_timeout)
    if isinstance(config, str):
        return [
            Finding(
                "redis persistence",
                "unchecked",
                f"could not read the server's settings ({config}); CONFIG is often disabled "
                "on managed Redis: check appendonly and maxmemory-policy in the provider's "
                "console",
            )
        ]
    return [_persistence(config), _eviction(config)]


def _persistence(config: dict[str, str]) -> Finding:
    if config.get("appendonly") != "yes":
        return Finding(
            "redis persistence",
            "problem",
            f"appendonly is {config.get('appendonly', 'unset')}: acknowledged pushes live "
            "only in memory, and a Redis restart or crash loses every queued task",
            "set 'appendonly yes' and 'appendfsync everysec' in redis.conf (at runtime: "
            "CONFIG SET appendonly yes, then CONFIG REWRITE); in docker-compose: "
            "redis-server --appendonly yes --appendfsync everysec",
        )
    if config.get("appendfsync") == "no":
        return Finding(
            "redis persistence",
            "problem",
            "appendfsync is no: the OS flushes the AOF when it likes, so a power failure "
            "can lose about 30 s of acknowledged pushes",
            "set 'appendfsync everysec' (about 1 s at risk) or 'always'",
        )
    fsync = config.get("appendfsync", "everysec")
    return Finding("redis persistence", "ok", f"appendonly yes, appendfsync {fsync}")


def _eviction(config: dict[str, str]) -> Finding:
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        return Finding(
            "redis eviction",
            "problem",
            f"maxmemory-policy is {policy}: when memory runs out Redis deletes keys, "
            "queued tasks and their records included",
            "set 'maxmemory-policy noeviction' (pushes then fail loudly when Redis is full) "
            "and give Redis enough memory",
        )
    return Finding("redis eviction", "ok", "maxmemory-policy noeviction")


def _redis_config(url: str, timeout: float) -> dict[str, str] | str:
    """The server's settings, or why they could not be read.

    The doctor inspects the server's own configuration, which no backend primitive
    exposes, so it speaks to Redis directly here; driver errors stay inside this function.
    """
    import redis

    client = redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    try:
        config: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "maxmemory-policy"):
            reply: dict[Any, Any] = client.config_get(name)
            config.update((str(key), str(value)) for key, value in reply.items())
        return config
    except redis.ResponseError as exc:
        return f"CONFIG GET refused: {exc}"
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def check_rabbitmq(settings: Settings) -> list[Finding]:
    """Pipelines whose hard time limit is above the broker's consumer_timeout: the broker
    would close the channel mid-run and deliver the task again."""
    if backend_for_url(settings.backend_url()) is not QueueBackend.RABBITMQ:
        return [Finding("rabbitmq timeout", "skipped", "the backend is not RabbitMQ")]
    try:
        service = PipelineService.from_import_paths(settings.worker.pipelines)
    except ConveyorError as exc:
        return [Finding("rabbitmq timeout", "unchecked", _one_line(str(exc)))]
    findings: list[Finding] = []
    with QueueManager.from_settings(settings) as queue:
        for pipeline in service.pipelines.values():
            limit, what = pipeline.hard_limit(), f"pipeline {pipeline.name!r}"
            if limit is None:
                findings.append(Finding(
                    "rabbitmq timeout", "problem",
                    f"{what} has no hard time limit: a run longer than the broker's "
                    "consumer_timeout is delivered again while it still runs",
                    "give the pipeline (or each step) a timeout below consumer_timeout",
                ))  # fmt: skip
                continue
            try:
                queue.check_time_limit(limit, what)
            except ConveyorError as exc:
                fix = "lower the limit, or raise consumer_timeout on the broker"
                findings.append(Finding("rabbitmq timeout", "problem", _one_line(str(exc)), fix))
            else:
                findings.append(
                    Finding("rabbitmq timeout", "ok", f"{what}: hard limit {limit:g}s fits")
                )
    return findings


def _one_line(text: str) -> str:
    return " ".join(text.split())
