"""Checks of how workers are run: supervisor and docker-compose must outwait the drain.

On SIGTERM a worker stops taking tasks and waits up to ``worker.max_shutdown_wait`` for the
running ones. supervisor (``stopwaitsecs``) and docker (``stop_grace_period``) SIGKILL it
after their own wait, 10 s by default: shorter than the drain, and every stop or deploy
kills tasks mid-run (they come back only after their lease runs out, and count as a crash).

The wait to compare against is the one the deployed worker will use: its environment's
``CONVEYOR_WORKER__MAX_SHUTDOWN_WAIT``, else the file its ``CONVEYOR_CONFIG`` names, else the
doctor's own settings; each finding says which.
"""

from __future__ import annotations

import configparser
import math
import re
import signal
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..errors import ConfigError
from ..settings import Settings, load_settings
from ..urls import mask_url
from . import Finding
from .starts import expand_program, log_dir_findings, program_numbers, restart_finding
from .supervisord import SupervisordError, read_config_info

T = TypeVar("T")

_WORKER_COMMAND = re.compile(r"worker\.py\b|\bconveyor\b.*\bworker\b")
_DRAIN_SIGNALS = ("TERM", "INT")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_ENV_PAIR = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*("(?:[^"\\]|\\.)*"|\'[^\']*\'|[^,]*)')


def _suggest(wait: float, margin: float) -> int:
    return math.ceil(wait + max(margin, 30.0))


def _verdict(
    check: str, where: str, waits: float, *, wait: tuple[float, str], margin: float, setting: str
) -> Finding:
    seconds, origin = wait
    if waits >= seconds + margin:
        return Finding(
            check,
            "ok",
            f"{where}: {setting} {waits:g}s >= max_shutdown_wait {seconds:g}s ({origin}) "
            f"+ {margin:g}s margin",
        )
    return Finding(
        check,
        "problem",
        f"{where}: {setting} is {waits:g}s but the worker may drain for {seconds:g}s "
        f"({origin}): a stop SIGKILLs it mid-task",
        f"set {setting} to at least {_suggest(seconds, margin)}s (max_shutdown_wait "
        f"+ {margin:g}s or more)",
    )


def _signal_finding(check: str, where: str, name: str) -> Finding | None:
    short = name.upper().removeprefix("SIG")
    if short in _DRAIN_SIGNALS:
        return None
    return Finding(
        check,
        "problem",
        f"{where}: stop signal {name}: the worker drains only on SIGTERM or SIGINT",
        "use SIGTERM (supervisor: stopsignal=TERM; compose: stop_signal: SIGTERM)",
    )


def deployed_wait(
    env: Mapping[str, str], settings: Settings, bases: Iterable[Path]
) -> tuple[float, str]:
    """The ``max_shutdown_wait`` a worker started with ``env`` uses, and where it came from."""
    return _deployed(
        env, settings, bases, name="CONVEYOR_WORKER__MAX_SHUTDOWN_WAIT", parse=float,
        read=lambda found: found.worker.max_shutdown_wait,
    )  # fmt: skip


def deployed_broker_wait(
    env: Mapping[str, str], settings: Settings, bases: Iterable[Path]
) -> tuple[float | str, str]:
    """The ``broker_wait`` (seconds or ``"forever"``) a worker started with ``env`` uses."""
    return _deployed(
        env, settings, bases, name="CONVEYOR_WORKER__BROKER_WAIT", parse=_broker_wait,
        read=lambda found: found.worker.broker_wait,
    )  # fmt: skip


def _broker_wait(text: str) -> float | str:
    return "forever" if text.strip().lower() == "forever" else float(text)


def _deployed(
    env: Mapping[str, str],
    settings: Settings,
    bases: Iterable[Path],
    *,
    name: str,
    parse: Callable[[str], T],
    read: Callable[[Settings], T],
) -> tuple[T, str]:
    """A worker setting as the deployed worker sees it: its environment's ``name``, else
    the file its ``CONVEYOR_CONFIG`` names, else the doctor's own settings."""
    own = env.get(name)
    if own:
        try:
            return parse(own), f"{name} in its environment"
        except ValueError:
            pass
    named = env.get("CONVEYOR_CONFIG")
    if named:
        candidates = [Path(named)] if Path(named).is_absolute() else [b / named for b in bases]
        for path in candidates:
            if path.is_file():
                try:
                    return read(load_settings(path)), str(path)
                except ConfigError:
                    break
    return read(settings), "the doctor's settings"


# -- supervisor -------------------------------------------------------------------------------


def check_supervisor_file(path: Path, settings: Settings, margin: float) -> list[Finding]:
    """``[program:...]`` sections that run a Conveyor worker, read from a config file."""
    parser = configparser.RawConfigParser(strict=False, inline_comment_prefixes=(";",))
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        return [
            Finding(
                "supervisor",
                "problem",
                f"cannot read {path}: {_brief(exc)}",
                "pass the right file with --supervisor-conf",
            )
        ]
    findings: list[Finding] = []
    for section in parser.sections():
        options = dict(parser.items(section))
        if not section.startswith("program:") or not _WORKER_COMMAND.search(
            options.get("command", "")
        ):
            continue
        where = f"{path} [{section}]"
        raw = options.get("stopwaitsecs", "10")  # supervisor's default
        try:
            waits = float(raw)
        except ValueError:
            findings.append(Finding("supervisor", "unchecked", f"{where}: stopwaitsecs={raw}"))
            continue
        env = dict(_supervisor_env(options.get("environment", "")))
        bases = [Path.cwd(), path.resolve().parent.parent]
        if "%(" not in options.get("directory", "%("):
            bases.insert(0, Path(options["directory"]))
        wait = deployed_wait(env, settings, bases)
        findings.append(
            _verdict("supervisor", where, waits, wait=wait, margin=margin, setting="stopwaitsecs")
        )
        signal_problem = _signal_finding("supervisor", where, options.get("stopsignal", "TERM"))
        findings += [signal_problem] if signal_problem else []
        findings += _program_starts(path, section, options, settings=settings, env=env, bases=bases)
    if not findings:
        findings.append(
            Finding("supervisor", "unchecked", f"{path}: no [program:...] runs a Conveyor worker")
        )
    return findings


def _program_starts(
    path: Path,
    section: str,
    options: Mapping[str, str],
    *,
    settings: Settings,
    env: Mapping[str, str],
    bases: list[Path],
) -> list[Finding]:
    """Log directories that must exist, and whether the start retries outlast an outage."""
    where = f"{path} [{section}]"
    try:
        files, note = expand_program(options, section, path)
        findings = log_dir_findings("supervisor logs", where, files, note)
    except (KeyError, ValueError) as exc:
        findings = [
            Finding(
                "supervisor logs",
                "unchecked",
                f"{where}: a log file path uses %({_brief(exc)})s, which is not known here "
                "(run the doctor with supervisord's environment, or pass --supervisor-url)",
            )
        ]
    numbers = program_numbers(options)
    if numbers is None:
        text = f"{where}: startsecs or startretries is not a number"
        findings.append(Finding("supervisor starts", "unchecked", text))
    else:
        broker_wait = deployed_broker_wait(env, settings, bases)
        findings.append(restart_finding("supervisor starts", where, *numbers, broker_wait))
    return findings


def _supervisor_env(text: str) -> Iterable[tuple[str, str]]:
    for match in _ENV_PAIR.finditer(text):
        value = match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        yield match.group(1), value


def check_supervisord(url: str, settings: Settings, margin: float) -> list[Finding]:
    """The same check against a running supervisord, through its XML-RPC interface."""
    try:
        infos = read_config_info(url)
    except SupervisordError as exc:
        return [
            Finding(
                "supervisord",
                "problem",
                str(exc),
                "check --supervisor-url (http://host:9001 or unix:///path/to.sock) "
                "and the [inet_http_server] / [unix_http_server] section",
            )
        ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for info in infos:
        if _WORKER_COMMAND.search(str(info.get("command", ""))):
            groups.setdefault(str(info.get("group")), []).append(info)
    findings = []
    for group, processes in sorted(groups.items()):
        where = f"supervisord {group} ({len(processes)} process(es))"
        waits = min(float(info.get("stopwaitsecs", 10)) for info in processes)
        origin = (settings.worker.max_shutdown_wait, "the doctor's settings")
        findings.append(
            _verdict(
                "supervisord", where, waits, wait=origin, margin=margin, setting="stopwaitsecs"
            )
        )
        name = signal.Signals(int(processes[0].get("stopsignal", signal.SIGTERM))).name
        signal_problem = _signal_finding("supervisord", where, name)
        findings += [signal_problem] if signal_problem else []
        files = {
            f"{info.get('name')} {key}": str(info.get(key))
            for info in processes
            for key in ("stdout_logfile", "stderr_logfile")
            if isinstance(info.get(key), str)
        }
        findings += log_dir_findings("supervisord logs", where, files)
        numbers = program_numbers(processes[0])
        if numbers is not None:
            broker_wait = (settings.worker.broker_wait, "the doctor's settings")
            findings.append(restart_finding("supervisord starts", where, *numbers, broker_wait))
    return findings or [
        Finding(
            "supervisord",
            "unchecked",
            f"no program of the supervisord at {mask_url(url)} runs a Conveyor worker",
        )
    ]


# -- docker-compose ---------------------------------------------------------------------------


def parse_duration(value: Any) -> float:
    """A compose duration (``330s``, ``5m30s``, ``1h``, or a number of seconds) in seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if not text or _DURATION_PART.sub("", text):
        raise ValueError(f"not a duration: {value!r} (write e.g. 330s or 5m30s)")
    return sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(text))


def check_compose(path: Path, settings: Settings, margin: float) -> list[Finding]:
    """Worker services' ``stop_grace_period`` and ``stop_signal``; Redis services' AOF."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return [
            Finding(
                "compose",
                "problem",
                f"cannot read {path}: {_brief(exc)}",
                "pass the right file with --compose",
            )
        ]
    services = data.get("services") if isinstance(data, dict) else None
    if not isinstance(services, dict):
        return [Finding("compose", "unchecked", f"{path}: no services")]
    findings: list[Finding] = []
    for name, service in services.items():
        if not isinstance(service, dict):
            continue
        image = str(service.get("image", ""))
        if image.startswith("redis") or (name == "redis" and not image):
            findings += _compose_redis(path, name, service)
        elif "worker" in name or _WORKER_COMMAND.search(_command(service)):
            findings += _compose_worker(path, name, service, settings, margin)
    return findings or [Finding("compose", "unchecked", f"{path}: no worker service found")]


def _compose_worker(
    path: Path, name: str, service: dict[str, Any], settings: Settings, margin: float
) -> list[Finding]:
    where = f"{path} service {name}"
    try:
        grace = parse_duration(service.get("stop_grace_period", "10s"))  # docker's default
    except ValueError as exc:
        return [Finding("compose", "problem", f"{where}: stop_grace_period: {exc}")]
    env = _compose_env(service.get("environment"))
    wait = deployed_wait(env, settings, [path.resolve().parent, Path.cwd()])
    findings = [
        _verdict("compose", where, grace, wait=wait, margin=margin, setting="stop_grace_period")
    ]
    signal_problem = _signal_finding("compose", where, str(service.get("stop_signal", "SIGTERM")))
    return findings + ([signal_problem] if signal_problem else [])


def _compose_redis(path: Path, name: str, service: dict[str, Any]) -> list[Finding]:
    where = f"{path} service {name}"
    words = _command(service).split()
    if any(word.endswith(".conf") for word in words):
        return [Finding("compose redis", "unchecked", f"{where}: settings in a redis.conf")]
    options = {
        words[i].lstrip("-"): words[i + 1]
        for i in range(len(words) - 1)
        if words[i].startswith("--")
    }
    if options.get("appendonly") != "yes":
        return [
            Finding(
                "compose redis",
                "problem",
                f"{where}: started without --appendonly yes: a restart loses queued tasks",
                "command: redis-server --appendonly yes --appendfsync everysec "
                "--maxmemory-policy noeviction (and a volume for /data)",
            )
        ]
    policy = options.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        return [
            Finding(
                "compose redis",
                "problem",
                f"{where}: maxmemory-policy {policy} evicts tasks",
                "use --maxmemory-policy noeviction",
            )
        ]
    return [Finding("compose redis", "ok", f"{where}: appendonly yes, noeviction")]


def _command(service: dict[str, Any]) -> str:
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        parts.append(" ".join(map(str, value)) if isinstance(value, list) else str(value or ""))
    return " ".join(part for part in parts if part)


def _compose_env(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return dict(str(item).split("=", 1) for item in value if "=" in str(item))
    return {}


def _brief(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
