"""The Redis connection of one server, its error translation, and the Lua scripts.

Scripts live in ``lua/``, one per operation, each opening with a header that names its
ARGV; ``-- @include`` lines pull in ``_lifecycle.lua`` (the transitions), and every script
is prefixed with the constants generated from ``conveyor.lifecycle``. They are loaded once
per server and called by SHA; after a server restart or ``SCRIPT FLUSH`` (NOSCRIPT) they are
loaded again and the call is retried once.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

import redis
from loguru import logger
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError

from ...errors import (
    BackendError,
    BrokerAuthenticationError,
    BrokerUnavailableError,
    ConfigError,
)
from ...lifecycle import lua_header
from ...urls import mask_url

SCRIPTS = (
    "enqueue", "claim", "settle", "renew", "cancel", "retry", "due", "published", "sweep",
    "purge", "migrate",
)  # fmt: skip
_INCLUDE = re.compile(r"^-- @include (\S+)$", re.MULTILINE)
#: Longest single BLPOP: the socket timeout stays above it.
MAX_BLOCK = 5.0
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


def load_script(name: str) -> str:
    """One script with the generated constants first and its ``-- @include`` lines expanded
    (static files only: no script is built from runtime values)."""
    folder = resources.files("conveyor.backends.redis") / "lua"
    source = (folder / f"{name}.lua").read_text(encoding="utf-8")
    body = _INCLUDE.sub(lambda m: (folder / m.group(1)).read_text(encoding="utf-8"), source)
    return lua_header() + body


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
    """A redis-py client with Conveyor's error translation and script calls."""

    def __init__(self, url: str, *, connect_timeout: float) -> None:
        self.safe_url = mask_url(url)
        # A server that accepts but never answers (paused, or a black-holed connection)
        # must fail within seconds too: 2 x connect_timeout, at least 3 s. Blocking waits
        # stay a second shorter than this so they never trip it. No retries inside
        # redis-py: one failed call is reported at once, and the caller (a worker riding
        # out an outage) decides when to try again.
        socket_timeout = max(2.0 * connect_timeout, 3.0)
        self.max_block = min(MAX_BLOCK, socket_timeout - 1.0)
        try:
            self.redis: redis.Redis = redis.Redis.from_url(
                url,
                decode_responses=True,
                encoding_errors="surrogateescape",
                socket_connect_timeout=connect_timeout,
                socket_timeout=socket_timeout,
                socket_keepalive=True,
                socket_keepalive_options=KEEPALIVE,
                health_check_interval=30,
            )
        except ValueError as exc:  # a typo in the URL: waiting for the server would not help
            raise ConfigError(f"url: bad Redis URL {self.safe_url}: {exc}") from None
        self._source = {name: load_script(name) for name in SCRIPTS}
        self._sha: dict[str, str] = {}
        with self.translate():
            self.redis.ping()
            self._load_scripts()
        self._warn_if_unsafe()

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
            raise BrokerUnavailableError(
                f"cannot reach Redis at {self.safe_url}: {exc}. Is redis-server running "
                "there? Check the URL (--url, CONVEYOR_URL or REDIS_URL)"
            ) from None
        except ResponseError as exc:
            text = str(exc)
            if text.startswith(("WRONGPASS", "NOAUTH", "NOPERM")):
                raise BrokerAuthenticationError(
                    f"Redis at {self.safe_url} refused the credentials ({text}); "
                    "check the user and password in the URL or REDIS_URL"
                ) from None
            raise BackendError(f"Redis at {self.safe_url} answered with an error: {text}") from None

    def _load_scripts(self) -> None:
        for name, source in self._source.items():
            self._sha[name] = str(self.redis.script_load(source))

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Call a script by SHA; load the scripts again and retry once on NOSCRIPT."""
        argv = [wire(arg) for arg in args]
        with self.translate():
            try:
                return self.redis.evalsha(self._sha[name], len(keys), *keys, *argv)
            except NoScriptError:
                self._load_scripts()
                return self.redis.evalsha(self._sha[name], len(keys), *keys, *argv)

    def now(self) -> float:
        with self.translate():
            seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def _warn_if_unsafe(self) -> None:
        """Say at start when this server would lose acknowledged tasks."""
        if self.safe_url in _checked_servers:
            return
        _checked_servers.add(self.safe_url)
        try:
            config = self.redis.config_get("appendonly")
            config.update(self.redis.config_get("maxmemory-policy"))
        except redis.RedisError:
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

    def close(self) -> None:
        self.redis.close()
