"""Typed settings: ``config/*.yaml`` under environment overrides, validated once at start.

Precedence, highest first: keyword arguments > environment > YAML file > defaults.
Environment names use the ``CONVEYOR_`` prefix and ``__`` between levels
(``CONVEYOR_QUEUE__NAME``, ``CONVEYOR_WORKER__CONCURRENCY``); ``CONVEYOR_URL`` names the
backend by URL and beats every other backend setting; ``REDIS_URL`` and ``RABBITMQ_URL``
are honoured because deployments (docker-compose files, existing deployments) already set them, and
``CONVEYOR_API_TOKEN`` (the HTTP API's bearer token) as the name people expect.

Nothing is read at import: the environment and the file are read when a ``Settings`` is
built, so tests and embedders control both. A bad value raises ``ConfigError`` naming the
key path, the reason and where the value came from; a typo'd key is an error, never
silently ignored. ``repr``/``str`` mask URL passwords and the API token, so settings can
be logged.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .backends import QueueBackend, backend_for_url, spec_for_kind, task_store_schemes
from .durability import parse_durability
from .errors import ConfigError, TaskTypeError, TaskValidationError
from .urls import mask_url
from .validation import DEFAULT_JSON_DEPTH, MAX_JSON_DEPTH, MAX_SECONDS, check_queue_name

DEFAULT_CONFIG = Path("config/development.yaml")
_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
#: Plain environment names honoured besides CONVEYOR_<SECTION>__<KEY>: (section, key, name).
_ENV_ALIASES = (
    ("redis", "url", "REDIS_URL"),
    ("rabbitmq", "url", "RABBITMQ_URL"),
    ("api", "token", "CONVEYOR_API_TOKEN"),
)
#: The parsed YAML file for the ``Settings`` being built. pydantic-settings gives
#: ``settings_customise_sources`` no per-call input, and a context variable keeps
#: concurrent loads (threads, tasks) apart where a class attribute would not.
_file_layer: ContextVar[Mapping[str, Any] | None] = ContextVar("conveyor_file_layer", default=None)


def _check_scheme(url: str, kind: QueueBackend | None) -> str:
    """Reject a URL whose scheme names no backend, or (with ``kind``) another backend."""
    try:
        found = backend_for_url(url)
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix("url: ")) from None
    if kind is not None and found is not kind:
        raise ValueError(f"this is a {found.value} URL, not a {kind.value} one")
    return url


def _split_list(value: Any) -> Any:
    """Env values for lists may be JSON (``["a","b"]``) or comma-separated (``a,b``)."""
    if not isinstance(value, str):
        return value
    if value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list ({exc}); or write a,b,c") from None
    return [part.strip() for part in value.split(",") if part.strip()]


def _queue_name(value: str) -> str:
    """The same rule as ``QueueManager``: printable, no spaces or braces, <= 200 chars."""
    try:
        return check_queue_name(value, "name")
    except (TaskValidationError, TaskTypeError) as exc:
        raise ValueError(exc.reason) from None


StrList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]
QueueName = Annotated[str, AfterValidator(_queue_name)]
QueueNames = Annotated[list[QueueName], NoDecode, BeforeValidator(_split_list)]
#: Durations become deadlines (now + value): finite and at most 10 years.
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]
AnyUrl = Annotated[str, AfterValidator(partial(_check_scheme, kind=None))]
RedisUrl = Annotated[str, AfterValidator(partial(_check_scheme, kind=QueueBackend.REDIS))]
AmqpUrl = Annotated[str, AfterValidator(partial(_check_scheme, kind=QueueBackend.RABBITMQ))]


def _check_task_store(url: str) -> str:
    """A URL of a backend whose row in the backend table says it can keep task records."""
    schemes = task_store_schemes()
    if url.split("://", 1)[0].lower() not in schemes or "://" not in url:
        raise ValueError(f"must be a URL of {', '.join(s + '://' for s in schemes)}")
    return url


def _check_durability(value: str | None) -> str | None:
    """``replicas=N[,timeout=S]``, checked now so a typo stops the start, not the first push."""
    try:
        parse_durability(value)
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix("durability: ")) from None
    return value


TaskStoreUrl = Annotated[str, AfterValidator(_check_task_store)]
DurabilityText = Annotated[str | None, AfterValidator(_check_durability)]


def _wait_value(value: Any) -> Any:
    """Seconds (>= 0) or the word ``forever``; one clear error for anything else."""
    if isinstance(value, str) and value.strip().lower() == "forever":
        return "forever"
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not seconds >= 0 or math.isinf(seconds):
        raise ValueError("must be a number of seconds (>= 0) or 'forever'")
    return seconds


BrokerWait = Annotated[float | Literal["forever"], BeforeValidator(_wait_value)]


class _Section(BaseModel):
    """A settings section: unknown keys are errors, values are fixed once loaded."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True
    )

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        return _masked(super().__repr_args__())


class SqliteSettings(_Section):
    path: str = Field(default="conveyor.db", min_length=1)


class RedisSettings(_Section):
    """``url``: one server, ``redis+cluster://...`` or ``redis+sentinel://...``.
    ``durability``: ``replicas=N[,timeout=S]`` makes pushes and acks wait until N replicas
    have them (Redis WAIT); it beats a ``durability=`` parameter in the URL."""

    url: RedisUrl = spec_for_kind(QueueBackend.REDIS).default_url
    durability: DurabilityText = None


class RabbitMQSettings(_Section):
    """``task_store``: where task records live (RabbitMQ keeps none); None uses the default,
    ``sqlite:///conveyor-rabbitmq.db`` in the working directory. Use Redis when workers run
    on several hosts."""

    url: AmqpUrl = spec_for_kind(QueueBackend.RABBITMQ).default_url
    task_store: TaskStoreUrl | None = None


class QueueSettings(_Section):
    """Tuning passed to ``QueueManager`` (see its docstring for what each one means)."""

    name: QueueName = "default"
    visibility_timeout: Seconds = 60.0
    max_deliveries: int = Field(default=5, ge=1, le=1000)
    max_priority: int = Field(default=10, ge=1, le=255)
    max_payload_bytes: int = Field(default=1024 * 1024, gt=0, le=512 * 1024 * 1024)
    #: Lists and objects nested deeper than this are refused in data, results, checkpoints.
    max_json_depth: int = Field(default=DEFAULT_JSON_DEPTH, ge=1, le=MAX_JSON_DEPTH)
    result_ttl: Seconds = 7 * 24 * 3600.0
    connect_timeout: Seconds = 5.0
    #: Per-key concurrency limits: key -> at most that many of its tasks running at once
    #: (``"*"``: any key without its own entry). A push's smaller max_concurrency wins.
    key_limits: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    #: Aging: seconds of waiting worth one priority level (None: off). SQLite and Redis.
    aging_interval: Seconds | None = None


class ReserveSettings(_Section):
    """``worker.reserve``: keep ``slots`` of the worker's slots for tasks of declared
    priority ``priority`` or higher, so urgent work starts at once on a busy worker."""

    priority: int = Field(ge=0, le=255)
    slots: int = Field(default=1, ge=1)


class WorkerSettings(_Section):
    """How a worker process runs; the recycling limits (None: no limit) end it cleanly."""

    queues: QueueNames = Field(default_factory=lambda: ["default"], min_length=1)
    concurrency: int = Field(default=1, ge=1)
    max_shutdown_wait: float = Field(default=300.0, ge=0)
    shutdown_mode: Literal["requeue", "fail"] = "requeue"
    max_jobs: int | None = Field(default=None, ge=1)
    max_time: float | None = Field(default=None, gt=0)
    memory_mb: int | None = Field(default=None, ge=1)
    pipelines: StrList = Field(default_factory=list)
    heartbeat_interval: float = Field(default=5.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    retry_backoff: float = Field(default=2.0, ge=0)
    max_backoff: float = Field(default=600.0, ge=0)
    #: How long a starting worker waits for an unreachable backend (Redis, RabbitMQ):
    #: ``forever`` (the default: a worker started before its broker, or during an outage,
    #: just waits) or a number of seconds (0: give up at once, exit 2).
    broker_wait: BrokerWait = "forever"
    #: Backoff between connection attempts: doubling from ``reconnect_backoff`` up to
    #: ``reconnect_max_backoff`` seconds, with jitter, so work resumes within about
    #: ``reconnect_max_backoff`` of the broker answering again.
    reconnect_backoff: float = Field(default=0.1, gt=0)
    reconnect_max_backoff: float = Field(default=1.0, gt=0)
    #: A pipeline hook (on_success...) running longer is logged and left behind.
    hook_timeout: float = Field(default=30.0, gt=0)
    #: Run the scheduler (config ``schedules:`` and pipelines' schedules) in this worker.
    run_schedules: bool = True
    #: Step-boundary preemption (None: off): a running preemptible task yields to a ready
    #: task whose declared priority is at least this much higher and that has waited
    #: longer than ``preempt_after`` seconds; each task yields at most ``max_preemptions``.
    preempt_margin: int | None = Field(default=None, ge=1)
    preempt_after: float = Field(default=0.0, ge=0)
    max_preemptions: int = Field(default=3, ge=0)
    reserve: ReserveSettings | None = None

    #: Where steps run: ``process`` (the default: one child process per slot, killed at a
    #: hard time limit, recycled by memory_mb) or ``thread`` (threads of the worker, for
    #: tasks that need no isolation; refuses hard time limits and memory_mb at start).
    pool: Literal["process", "thread"] = "process"

    @model_validator(mode="after")
    def _reserve_fits(self) -> WorkerSettings:
        if self.reserve is not None and self.reserve.slots >= self.concurrency:
            raise ValueError(
                f"worker.reserve.slots ({self.reserve.slots}) must be below "
                f"worker.concurrency ({self.concurrency}): at least one slot must take any task"
            )
        return self

    @model_validator(mode="after")
    def _backoff_order(self) -> WorkerSettings:
        if self.reconnect_max_backoff < self.reconnect_backoff:
            raise ValueError(
                f"worker.reconnect_max_backoff ({self.reconnect_max_backoff:g}s) must be at "
                f"least worker.reconnect_backoff ({self.reconnect_backoff:g}s)"
            )
        return self

    def broker_wait_seconds(self) -> float | None:
        """``broker_wait`` as seconds; None means wait forever."""
        return None if self.broker_wait == "forever" else float(self.broker_wait)


class LoggingSettings(_Section):
    """``json`` is ``json_lines`` in Python: a field named ``json`` shadows BaseModel.json."""

    model_config = ConfigDict(serialize_by_alias=True)

    level: str = "INFO"
    json_lines: bool = Field(default=False, alias="json")
    file: str | None = None
    rotation: str = "50 MB"
    retention: str = "14 days"

    @field_validator("level")
    @classmethod
    def _known_level(cls, level: str) -> str:
        if level.upper() not in _LEVELS:
            raise ValueError(f"must be one of {', '.join(_LEVELS)}")
        return level.upper()


class ApiSettings(_Section):
    """``conveyor api``: where the HTTP API and dashboard listen, and their bearer token.

    With no ``token`` every endpoint is open, so the default binds the loopback address
    only; ``CONVEYOR_API_TOKEN`` (or ``CONVEYOR_API__TOKEN``) sets it from the environment.
    Without a token, requests must also name one of ``allowed_hosts`` in their ``Host``
    header (``name`` allows any port, ``name:port`` one), whatever address the server binds:
    a web page cannot then reach the API by pointing its own DNS name at it (DNS rebinding).
    ``host`` itself is allowed too unless it is a wildcard (0.0.0.0, ::).
    """

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)
    token: SecretStr | None = Field(default=None, min_length=1)
    #: The API's own rotating log file (level, format and rotation as in ``logging``);
    #: None: stderr only. ``logging.file`` is the worker's: two processes rotating one
    #: file race each other, so the API never writes there.
    log_file: str | None = Field(default=None, min_length=1)
    allowed_hosts: StrList = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"], min_length=1
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name or not name.isprintable() or any(ch in name for ch in " /@?#,"):
                raise ValueError(f"{name!r} is not a host name (e.g. example.com or host:8000)")
        return [name.lower() for name in names]


class Settings(BaseSettings):
    """Everything a producer, worker or CLI needs; build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_",
        env_nested_delimiter="__",
        env_ignore_empty=True,
        extra="forbid",
        frozen=True,
    )

    backend: QueueBackend = QueueBackend.SQLITE
    url: AnyUrl | None = None
    sqlite: SqliteSettings = Field(default_factory=SqliteSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    rabbitmq: RabbitMQSettings = Field(default_factory=RabbitMQSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    #: Cron schedules (see conveyor.schedules): name, cron, queue, data, tz, priority, type,
    #: missed (skip | run_once), grace, options. Every worker runs them (worker.run_schedules).
    schedules: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _schedules_are_valid(self) -> Settings:
        if self.schedules:
            from .schedules import schedule_from

            for item in self.schedules:
                schedule_from(item)  # ConfigError (a ValueError) names the schedule and key
        return self

    @model_validator(mode="after")
    def _leases_outlive_heartbeats(self) -> Settings:
        # The worker renews its leases on each heartbeat: a lease shorter than the beat
        # would expire under a running task and hand it to a second worker.
        if self.worker.heartbeat_interval >= self.queue.visibility_timeout:
            raise ValueError(
                f"worker.heartbeat_interval ({self.worker.heartbeat_interval:g}s) must be "
                f"shorter than queue.visibility_timeout ({self.queue.visibility_timeout:g}s)"
            )
        return self

    def backend_url(self) -> str:
        """The URL to open: ``url`` when set, else the chosen backend's own URL."""
        if self.url:
            return self.url
        if self.backend is QueueBackend.SQLITE:
            return f"sqlite:///{self.sqlite.path}"
        # A backend's section (redis, rabbitmq, ...) names its URL; else the table's default.
        section = getattr(self, self.backend.value, None)
        url = getattr(section, "url", None)
        return url if isinstance(url, str) else spec_for_kind(self.backend).default_url

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        return _masked(super().__repr_args__())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The plain REDIS_URL/RABBITMQ_URL and CONVEYOR_API_TOKEN rank below the nested
        # CONVEYOR_<SECTION>__<KEY> names: the specific name wins.
        aliases = {
            section: {key: os.environ[name]}
            for section, key, name in _ENV_ALIASES
            if os.environ.get(name)
        }
        return (
            init_settings,
            env_settings,
            InitSettingsSource(settings_cls, aliases),
            InitSettingsSource(settings_cls, dict(_file_layer.get() or {})),
        )


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read and validate settings; raises ``ConfigError`` naming the bad key and its source.

    The file is ``config_path``, else ``$CONVEYOR_CONFIG``, else ``config/development.yaml``
    if it exists in the current directory, else none (defaults and environment only).
    ``overrides`` (e.g. ``url=...`` from a ``--url`` flag) beat everything else.
    """
    explicit = config_path if config_path is not None else os.environ.get("CONVEYOR_CONFIG")
    path = Path(explicit) if explicit else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    text, data = _read_yaml(path) if path is not None else ("", {})
    token = _file_layer.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [_describe(error, path, text, overrides) for error in exc.errors()]
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid settings{where}:\n  " + "\n  ".join(lines)) from None
    except SettingsError as exc:  # an env value that should be JSON and is not
        raise ConfigError(f"invalid settings in the environment: {exc}") from None
    finally:
        _file_layer.reset(token)


def _read_yaml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {path}{line}: YAML syntax error: {problem}") from None
    if data is None:
        return text, {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: must be a mapping of sections, got {type(data).__name__}"
        )
    return text, data


def _describe(error: Any, path: Path | None, text: str, overrides: Mapping[str, Any]) -> str:
    """One line per error: key path, reason, the offending value (masked) and its origin."""
    loc = [str(part) for part in error["loc"]]
    reason = str(error["msg"]).removeprefix("Value error, ")
    if not loc:  # a cross-field check; its message names the keys itself
        return reason
    if error["type"] == "extra_forbidden":
        reason = "unknown setting" + _suggestion(loc)
    elif loc[-1] == "token":  # never shown, even when it is the wrong type
        reason += " (got ***)"
    elif not isinstance(error.get("input"), dict):
        value = error.get("input")
        reason += f" (got {mask_url(value) if isinstance(value, str) else value!r})"
    return f"{'.'.join(loc)}: {reason} [{_origin(loc, path, text, overrides)}]"


def _suggestion(loc: list[str]) -> str:
    model: Any = Settings
    for part in loc[:-1]:
        model = model.model_fields[part].annotation
    names = [info.alias or name for name, info in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"; {hint}known keys here: {', '.join(names)}"


def _origin(loc: list[str], path: Path | None, text: str, overrides: Mapping[str, Any]) -> str:
    """Where the value came from, in precedence order: argument, environment, file."""
    if loc[0] in overrides:
        return "from the arguments"
    env = {name.upper() for name in os.environ}
    names = ["CONVEYOR_" + "__".join(loc[:i]).upper() for i in range(len(loc), 0, -1)]
    names += [name for section, key, name in _ENV_ALIASES if loc[:2] == [section, key]]
    for name in names:
        if name in env:
            return f"from environment variable {name}"
    if path is None:
        return "from the defaults"
    line = _yaml_line(text, loc)
    return f"from {path}" + (f", line {line}" if line else "")


def _yaml_line(text: str, loc: list[str]) -> int | None:
    """The 1-based line of the deepest key of ``loc`` found in the YAML text."""
    node, line = yaml.compose(text), None
    for part in loc:
        if isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        elif isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
            if not match:
                break
            key, node = match[0]
            line = key.start_mark.line + 1
        else:
            break
    return line


def _masked(args: Iterable[tuple[str | None, Any]]) -> Iterable[tuple[str | None, Any]]:
    secret = ("url", "task_store")
    return [(k, mask_url(v) if k in secret and isinstance(v, str) else v) for k, v in args]
