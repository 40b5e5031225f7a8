"""The deployment files say what the worker needs; checked without a Docker engine.

docker-compose.yml and the Dockerfile cannot be built here, so this checks what can be
checked: services, replicas, shutdown timers against ``max_shutdown_wait`` of the config
the containers use, environment names the settings really read, and that the image's
command exists in this package. The systemd unit goes through ``systemd-analyze verify``
when the tool is installed.
"""

from __future__ import annotations

import configparser
import getpass
import grp
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.cli import build_parser
from conveyor.doctor.deployment import parse_duration
from conveyor.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ROOT / "config" / "production.yaml"
MARGIN = 10.0
#: Names the settings read besides CONVEYOR_<SECTION>__<KEY> (see conveyor.settings).
PLAIN_NAMES = {"CONVEYOR_CONFIG", "CONVEYOR_URL", "REDIS_URL", "RABBITMQ_URL"}


def production_wait() -> float:
    return load_settings(PRODUCTION).worker.max_shutdown_wait


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def expand(value: str) -> str:
    """Compose's ``${NAME:-default}`` with nothing set: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def is_setting(name: str) -> bool:
    """Does ``Settings`` read this environment variable?"""
    if name in PLAIN_NAMES:
        return True
    if not name.startswith("CONVEYOR_"):
        return False
    section, _, key = name.removeprefix("CONVEYOR_").lower().partition("__")
    field = Settings.model_fields.get(section)
    if field is None:
        return False
    if not key:
        return True
    model: Any = field.annotation
    return key in model.model_fields or any(f.alias == key for f in model.model_fields.values())


# -- docker-compose.yml -------------------------------------------------------------------------


def test_compose_has_redis_rabbitmq_and_three_worker_replicas() -> None:
    services = compose()["services"]
    assert {"redis", "rabbitmq", "worker"} <= set(services)
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 3
    assert worker["command"] == ["conveyor", "worker"]
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert parse_duration(worker["stop_grace_period"]) >= production_wait() + MARGIN
    assert "redis" in worker["depends_on"]


def test_compose_redis_persists_and_never_evicts() -> None:
    command = compose()["services"]["redis"]["command"]
    words = command if isinstance(command, list) else command.split()
    pairs = dict(zip(words[1::2], words[2::2], strict=False))
    assert words[0] == "redis-server"
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert "/data" in " ".join(compose()["services"]["redis"]["volumes"])


def test_compose_worker_environment_is_what_the_settings_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environment = compose()["services"]["worker"]["environment"]
    assert {"CONVEYOR_CONFIG", "REDIS_URL"} <= set(environment)
    unknown = [name for name in environment if not is_setting(name)]
    assert not unknown, f"settings never read {unknown}"
    assert environment["CONVEYOR_CONFIG"] == "config/production.yaml"
    assert environment["REDIS_URL"] == "redis://redis:6379/0"
    # Loaded as the container would, from the image's working directory (the checkout here).
    for name in list(os.environ):
        if name.startswith("CONVEYOR_") or name in PLAIN_NAMES:
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, expand(str(value)))
    monkeypatch.chdir(ROOT)
    settings = load_settings()
    assert settings.backend_url() == "redis://redis:6379/0"
    assert settings.rabbitmq.url.endswith("@rabbitmq:5672/")
    assert settings.worker.max_shutdown_wait == production_wait()


# -- Dockerfile ---------------------------------------------------------------------------------


def dockerfile() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def test_dockerfile_runs_the_worker_in_exec_form_as_a_user() -> None:
    lines = dockerfile()
    assert lines[0] == "FROM python:3.11-slim"
    assert any(re.match(r"RUN .*pip install '?\.(\[[a-z,]+\])?'?(\s|$)", line) for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    (cmd,) = [line for line in lines if line.startswith("CMD ")]
    command = json.loads(cmd.removeprefix("CMD "))  # exec form: a JSON array, no shell
    assert command == ["conveyor", "worker"]


def test_the_image_command_exists_in_this_package() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["conveyor"] == "conveyor.cli:main"
    assert (Path(sys.executable).parent / "conveyor").exists()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "conveyor"), "worker", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "--concurrency" in done.stdout
    assert build_parser().parse_args(["worker", "-c", "2"]).concurrency == 2


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "*.db"} <= set(ignored)


# -- supervisor and systemd ---------------------------------------------------------------------


def ini(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, inline_comment_prefixes=(";",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path, encoding="utf-8")
    return parser


def test_supervisor_program_outwaits_the_drain() -> None:
    program = ini(ROOT / "supervisor" / "conveyor-worker.conf")["program:conveyor-worker"]
    assert program["process_name"] == "%(program_name)s_%(process_num)02d"
    assert int(program["numprocs"]) == 3
    assert program["stopsignal"] == "TERM"
    assert float(program["stopwaitsecs"]) >= production_wait() + MARGIN
    assert program["autorestart"] == "true"
    assert program["stopasgroup"] == program["killasgroup"] == "true"
    assert program["command"].endswith("/worker.py")
    assert 'CONVEYOR_CONFIG="config/production.yaml"' in program["environment"]
    assert program["stdout_logfile"]


def test_systemd_unit_outwaits_the_drain(tmp_path: Path) -> None:
    path = ROOT / "supervisor" / "conveyor-worker.service"
    service = ini(path)["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) >= production_wait() + MARGIN
    assert service["Restart"] == "always"
    assert re.fullmatch(r"\S+/\.venv/bin/conveyor worker", service["ExecStart"])
    # Environment= may repeat (the parser keeps the last): read the lines themselves.
    assert "Environment=CONVEYOR_CONFIG=config/production.yaml" in path.read_text().splitlines()

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # Rendered for this machine: this checkout's script and an existing user.
    text = path.read_text().replace("/opt/conveyor/.venv/bin/conveyor", str(
        Path(sys.executable).parent / "conveyor"))  # fmt: skip
    user = getpass.getuser()
    group = grp.getgrgid(os.getgid()).gr_name
    text = re.sub(r"(?m)^User=.*$", f"User={user}", text)
    text = re.sub(r"(?m)^Group=.*$", f"Group={group}", text)
    unit = tmp_path / "conveyor-worker.service"
    unit.write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_production_api_and_worker_write_separate_log_files() -> None:
    settings = load_settings(PRODUCTION)
    assert settings.logging.file and settings.api.log_file
    assert Path(settings.api.log_file) != Path(settings.logging.file)


def test_the_supervisor_log_directory_ships_with_the_checkout() -> None:
    """supervisor opens stdout_logfile before the worker runs and never creates its folder:
    a fresh clone must already have logs/."""
    program = ini(ROOT / "supervisor" / "conveyor-worker.conf")["program:conveyor-worker"]
    assert program["stdout_logfile"].startswith("%(ENV_CONVEYOR_HOME)s/logs/")
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    done = subprocess.run(
        [git, "-C", str(ROOT), "ls-files", "logs"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"not a git checkout: {done.stderr.strip()}")
    assert "logs/.gitkeep" in done.stdout.split()
