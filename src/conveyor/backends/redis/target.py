"""Which Redis deployment a URL names, and the redis-py client that speaks to it.

* ``redis://[[user]:password@]host:6379/0`` (also ``rediss://``, ``unix://``): one server.
* ``redis+cluster://[[user]:password@]host:port[,host:port...]/``: a Redis Cluster through
  redis-py's ``RedisCluster``; any reachable node is enough to find the others. A cluster
  has only database 0, so the path is empty, ``/`` or ``/0``.
* ``redis+sentinel://[[user]:password@]host:26379[,host:port...]/SERVICE[/DB]``: the master
  that the sentinels at those addresses name for SERVICE, found again after a failover.
  The userinfo is the master's (and its replicas') credentials; the sentinels' own are
  ``?sentinel_password=...`` (and ``&sentinel_username=...``) when they have
  ``requirepass`` set.

Query parameters Conveyor reads (removed before redis-py sees the URL), on every form:
``durability=replicas=N[,timeout=S]`` (see ``conveyor.durability``) and
``failover_timeout=S``: how long a call keeps retrying while a Cluster or Sentinel fails
over before it reports the backend unavailable (default 30; one server: no retrying).
Passwords never reach a log: ``safe_url`` is masked with ``conveyor.urls.mask_url``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

from ...durability import Durability, parse_durability
from ...errors import ConfigError
from ...urls import mask_url, query_pairs

Mode = Literal["single", "cluster", "sentinel"]
CLUSTER_SCHEMES = ("redis+cluster",)
SENTINEL_SCHEMES = ("redis+sentinel",)
#: A failover takes cluster-node-timeout (15 s by default) or down-after-milliseconds (30 s
#: by default) plus an election; set failover_timeout above yours.
DEFAULT_FAILOVER_TIMEOUT = 30.0
_OWN = ("durability", "failover_timeout")
_SENTINEL_OWN = ("sentinel_password", "sentinel_username")
_DEFAULT_PORT = {"cluster": 6379, "sentinel": 26379}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed Redis URL: the deployment, where it is, its credentials and our options."""

    mode: Mode
    safe_url: str
    url: str = ""  # single: the URL redis-py reads (our parameters removed)
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    durability: Durability | None = None
    failover_timeout: float = DEFAULT_FAILOVER_TIMEOUT

    @property
    def high_availability(self) -> bool:
        """Cluster and Sentinel fail over by themselves: calls ride it out."""
        return self.mode != "single"


def parse_target(url: str) -> RedisTarget:
    """Split a Redis URL into a RedisTarget, or raise ConfigError saying what is wrong."""
    safe = mask_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"url: bad Redis URL {safe}: {exc}") from None
    scheme = parts.scheme.lower()
    pairs = query_pairs(parts.query)
    own = {key: value for key, value in pairs if key in _OWN}
    durability = parse_durability(own.get("durability"))
    failover = _seconds(own.get("failover_timeout"), safe)
    if scheme not in CLUSTER_SCHEMES + SENTINEL_SCHEMES:
        plain = url
        if own:
            rest = urlencode([(k, v) for k, v in pairs if k not in _OWN], safe=":/@,")
            plain = urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment))
        return RedisTarget("single", safe, url=plain, durability=durability,
                           failover_timeout=failover)  # fmt: skip
    mode: Mode = "cluster" if scheme in CLUSTER_SCHEMES else "sentinel"
    allowed = _OWN + (_SENTINEL_OWN if mode == "sentinel" else ())
    unknown = sorted({key for key, _ in pairs if key not in allowed})
    if unknown:
        raise ConfigError(
            f"url: {safe} has parameters {', '.join(unknown)} that a {scheme} URL does not "
            f"take; it takes {', '.join(allowed)}"
        )
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = tuple(_host_port(text, _DEFAULT_PORT[mode], safe) for text in hosts.split(","))
    path = [unquote(piece) for piece in parts.path.split("/") if piece]
    target = RedisTarget(
        mode, safe, nodes=nodes, username=unquote(username) or None,
        password=unquote(password) if password else None,
        durability=durability, failover_timeout=failover,
    )  # fmt: skip
    if mode == "cluster":
        if path not in ([], ["0"]):
            raise ConfigError(
                f"url: {safe}: a Redis Cluster has only database 0; drop the path "
                f"(redis+cluster://host:port,host:port/)"
            )
        return target
    sentinel = dict(pairs)
    if not path or len(path) > 2:
        raise ConfigError(
            f"url: {safe} names no master; write "
            "redis+sentinel://host:26379,host:26380/SERVICE/DB (SERVICE as in 'sentinel "
            "monitor SERVICE ...')"
        )
    db = _db(path[1], safe) if len(path) == 2 else 0
    return RedisTarget(
        mode, safe, nodes=nodes, service=path[0], db=db, username=target.username,
        password=target.password, sentinel_username=sentinel.get("sentinel_username") or None,
        sentinel_password=sentinel.get("sentinel_password") or None,
        durability=durability, failover_timeout=failover,
    )  # fmt: skip


def _seconds(text: str | None, safe: str) -> float:
    if text is None:
        return DEFAULT_FAILOVER_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"url: failover_timeout must be seconds (>= 0), got {text!r} in {safe}")
    return value


def _db(text: str, safe: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"url: {safe}: the database must be a number, got {text!r}")
    return int(text)


def _host_port(text: str, default_port: int, safe: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``."""
    host, port = text.strip(), ""
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        port = rest.removeprefix(":")
    elif ":" in host:
        host, _, port = host.rpartition(":")
    if not host or (port and not port.isdigit()) or (port and not 0 < int(port) < 65536):
        raise ConfigError(f"url: {safe}: cannot read the address {text!r}; write host:port")
    return host, int(port) if port else default_port


def connect(target: RedisTarget, **options: Any) -> Any:
    """The redis-py client for a target: ``redis.Redis`` (one server, or a Sentinel's
    master) or ``RedisCluster``. ``options`` are connection settings (timeouts, decoding)."""
    import redis
    import redis.cluster
    import redis.sentinel
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # redis-py leaves these untyped: Any keeps mypy --strict quiet about them.
    cluster_class: Any = redis.cluster.RedisCluster
    node_class: Any = redis.cluster.ClusterNode
    sentinel_class: Any = redis.sentinel.Sentinel

    if target.mode == "single":
        try:
            return redis.Redis.from_url(target.url, **options)
        except ValueError as exc:  # a typo in the URL: waiting for the server would not help
            raise ConfigError(f"url: bad Redis URL {target.safe_url}: {exc}") from None
    credentials = {"username": target.username, "password": target.password}
    if target.mode == "cluster":
        options.pop("health_check_interval", None)  # RedisCluster does not take it
        # One quick retry inside redis-py (it refreshes the slot map on a connection error);
        # RedisClient retries with a backoff for as long as a failover may take.
        return cluster_class(
            startup_nodes=[node_class(host, port) for host, port in target.nodes],
            retry=Retry(NoBackoff(), 1), **credentials, **options,
        )  # fmt: skip
    timeouts = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel_auth = {
        "username": target.sentinel_username, "password": target.sentinel_password,
    }  # fmt: skip
    sentinel = sentinel_class(target.nodes, sentinel_kwargs={**timeouts, **sentinel_auth})
    return sentinel.master_for(target.service, db=target.db, **credentials, **options)
