"""How the Lua reaches Redis: one function library on Redis 7 (FCALL), scripts otherwise.

Each test uses a private server, because functions are server-wide (not per database):
flushing them on the shared server would pull them from under every other client.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from conveyor import QueueManager
from conveyor.backends.redis.library import LIBRARY_PREFIX, OPERATIONS, build_library
from helpers.private_redis import PrivateRedis


def _libraries(url: str) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        entries = [dict(zip(e[::2], e[1::2], strict=True)) for e in client.function_list()]
        return [str(entry["library_name"]) for entry in entries]
    finally:
        client.close()


def _drain_one(queue: QueueManager, task_id: str = "t1") -> None:
    """Push, reserve and ack one task: three operations through whichever path is in use."""
    assert queue.push(task_id, {"n": 1}, 5)
    message = queue.reserve(timeout=1)
    assert message is not None and message.task_id == task_id
    assert queue.ack(message)
    task = queue.get_task(task_id)
    assert task is not None and task.status == "success"


def test_operations_run_as_one_function_library(
    private_redis: Callable[..., PrivateRedis],
) -> None:
    server = private_redis()
    library = build_library()
    queue = QueueManager.from_url(server.url, queue_name="lib")
    try:
        _drain_one(queue)
        assert _libraries(server.url) == [library.name]
        assert library.name.startswith(LIBRARY_PREFIX)
        assert set(library.functions) == set(OPERATIONS)
        stats = redis.Redis.from_url(server.url).info("commandstats")
        assert stats["cmdstat_fcall"]["calls"] >= 3
        assert "cmdstat_evalsha" not in stats
    finally:
        queue.close()


def test_a_second_client_leaves_the_loaded_library_as_it_is(
    private_redis: Callable[..., PrivateRedis],
) -> None:
    server = private_redis()
    first = QueueManager.from_url(server.url, queue_name="lib")
    second = QueueManager.from_url(server.url, queue_name="lib")
    try:
        assert _libraries(server.url) == [build_library().name]
        _drain_one(second)
    finally:
        first.close()
        second.close()


def test_a_flushed_library_is_loaded_again_and_the_call_retried(
    private_redis: Callable[..., PrivateRedis],
) -> None:
    server = private_redis()
    queue = QueueManager.from_url(server.url, queue_name="lib")
    try:
        assert queue.push("before", {}, 1)
        redis.Redis.from_url(server.url).function_flush()  # what a restart without AOF does
        assert _libraries(server.url) == []
        _drain_one(queue)
        assert _libraries(server.url) == [build_library().name]
    finally:
        queue.close()


def test_a_server_that_refuses_function_gets_scripts(
    private_redis: Callable[..., PrivateRedis],
) -> None:
    """An ACL without FUNCTION (as on some managed services, and every Redis before 7)."""
    server = private_redis()
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser(
        "worker", enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
        commands=["+@all", "-function"],
    )  # fmt: skip
    url = server.url.replace("redis://", "redis://worker:secret@")
    queue = QueueManager.from_url(url, queue_name="lib")
    try:
        _drain_one(queue)
        admin.script_flush()  # the script path's own reload: NOSCRIPT, load, retry once
        _drain_one(queue, "t2")
        assert queue.get_queue_length() == 0
        assert _libraries(server.url) == []
        assert admin.info("commandstats")["cmdstat_evalsha"]["calls"] >= 3
    finally:
        queue.close()
        admin.close()


def test_only_a_refused_function_command_switches_to_scripts() -> None:
    """A passing state of the server (out of memory, busy, read-only) must not turn the
    library off for good: only an unknown or forbidden FUNCTION does."""
    from redis.exceptions import NoPermissionError, ReadOnlyError, ResponseError

    from conveyor.backends.redis.client import _refuses_functions

    assert _refuses_functions(ResponseError("ERR unknown command 'FUNCTION', with args"))
    assert _refuses_functions(ResponseError("ERR unknown subcommand 'LOAD'"))
    assert _refuses_functions(NoPermissionError("this user has no permissions to run it"))
    assert not _refuses_functions(ResponseError("OOM command not allowed when used memory"))
    assert not _refuses_functions(ResponseError("BUSY Redis is busy running a script"))
    assert not _refuses_functions(ReadOnlyError("You can't write against a read only replica"))
