"""``conveyor doctor`` flags each misconfiguration, built for real.

Redis servers are our own (``redis-server`` on a free port, started with the flags under
test, killed at teardown); supervisor and compose files are written to a temp dir; a
running supervisord is asked over XML-RPC. Exit codes: 0 when nothing is wrong, 1 when a
problem is found -- an unreachable backend included (it is a finding, not a usage error).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import unavailable
from conveyor.cli import main
from conveyor.doctor.deployment import parse_duration
from helpers.private_redis import PrivateRedis, free_port
from helpers.supervision import ROOT, Supervisord, supervisord_installed

PRODUCTION = ROOT / "config" / "production.yaml"

Doctor = Callable[..., tuple[int, list[dict[str, str]], str]]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    """Factory: ``redis_server("--appendonly", "yes")`` starts one; all are killed after."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    started: list[PrivateRedis] = []

    def start(*args: str) -> PrivateRedis:
        server = PrivateRedis(tmp_path / f"redis{len(started)}", *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def doctor(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Doctor:
    """Run ``conveyor doctor ARGS --json``; returns (exit code, findings, text of a 2nd run)."""
    monkeypatch.chdir(tmp_path)  # no default config/, supervisor/ or compose file here
    monkeypatch.delenv("CONVEYOR_CONFIG", raising=False)

    def run(*args: str) -> tuple[int, list[dict[str, str]], str]:
        code = main(["doctor", *args, "--json"])
        findings = json.loads(capsys.readouterr().out)["findings"]
        assert main(["doctor", *args]) == code
        return code, findings, capsys.readouterr().out

    return run


def by_check(findings: list[dict[str, str]], check: str) -> list[dict[str, str]]:
    return [finding for finding in findings if finding["check"] == check]


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/doctor.db"


# -- Redis ------------------------------------------------------------------------------------


def test_redis_without_persistence_is_flagged(
    redis_server: Callable[..., PrivateRedis], doctor: Doctor
) -> None:
    server = redis_server("--appendonly", "no")
    code, findings, text = doctor("--url", server.url)
    assert code == 1
    (persistence,) = by_check(findings, "redis persistence")
    assert persistence["status"] == "problem"
    assert "appendonly is no" in persistence["message"]
    assert "appendonly yes" in (persistence["fix"] or "")
    assert by_check(findings, "redis eviction")[0]["status"] == "ok"
    assert "PROBLEM" in text and "fix: " in text and "1 problem(s) found" in text


def test_an_evicting_redis_is_flagged(
    redis_server: Callable[..., PrivateRedis], doctor: Doctor
) -> None:
    server = redis_server("--appendonly", "yes", "--maxmemory-policy", "allkeys-lru")
    code, findings, _ = doctor("--url", server.url)
    assert code == 1
    assert by_check(findings, "redis persistence")[0]["status"] == "ok"
    (eviction,) = by_check(findings, "redis eviction")
    assert eviction["status"] == "problem"
    assert "allkeys-lru" in eviction["message"] and "noeviction" in (eviction["fix"] or "")


def test_a_persistent_noeviction_redis_is_clean(
    redis_server: Callable[..., PrivateRedis], doctor: Doctor
) -> None:
    server = redis_server("--appendonly", "yes", "--appendfsync", "everysec")
    code, findings, text = doctor("--url", server.url)
    assert code == 0, findings
    assert {f["status"] for f in findings} <= {"ok", "skipped"}
    assert "no problems found" in text
    assert by_check(findings, "rabbitmq timeout")[0]["status"] == "skipped"


def test_redis_with_config_disabled_says_it_could_not_check(
    redis_server: Callable[..., PrivateRedis], doctor: Doctor
) -> None:
    server = redis_server("--rename-command", "CONFIG", "")
    code, findings, _ = doctor("--url", server.url)
    assert code == 0
    (persistence,) = by_check(findings, "redis persistence")
    assert persistence["status"] == "unchecked"
    assert "could not read" in persistence["message"]


def test_a_backend_that_does_not_answer_is_a_problem(doctor: Doctor) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    code, findings, text = doctor("--url", url)
    assert code == 1
    (backend,) = by_check(findings, "backend")
    assert backend["status"] == "problem"
    assert "does not answer" in backend["message"]
    assert "hunter2" not in text and "***" in text
    assert not by_check(findings, "redis persistence")  # nothing more to ask a dead server


# -- supervisor -------------------------------------------------------------------------------


def write_program(path: Path, *lines: str) -> Path:
    path.write_text(
        "[program:conveyor-worker]\n"
        "command=/srv/app/.venv/bin/python /srv/app/worker.py ; the worker\n"
        "process_name=%(program_name)s_%(process_num)02d\nnumprocs=3\n" + "\n".join(lines) + "\n"
    )
    return path


def test_a_supervisor_stopwaitsecs_shorter_than_the_drain_is_flagged(
    doctor: Doctor, tmp_path: Path
) -> None:
    short = write_program(
        tmp_path / "short.conf",
        "stopwaitsecs=5",
        f'environment=CONVEYOR_CONFIG="{PRODUCTION}",PYTHONUNBUFFERED="1"',
    )
    code, findings, _ = doctor("--url", sqlite_url(tmp_path), "--supervisor-conf", str(short))
    assert code == 1
    (finding,) = by_check(findings, "supervisor")
    assert finding["status"] == "problem"
    assert "stopwaitsecs is 5s" in finding["message"] and "300s" in finding["message"]
    assert str(PRODUCTION) in finding["message"]  # the wait of the config the program uses
    assert "at least 330s" in (finding["fix"] or "")

    default = write_program(tmp_path / "default.conf")  # no stopwaitsecs: supervisor's 10 s
    code, findings, _ = doctor(
        "--url", sqlite_url(tmp_path), "--config", str(PRODUCTION), "--supervisor-conf",
        str(default),
    )  # fmt: skip
    assert code == 1
    assert "stopwaitsecs is 10s" in by_check(findings, "supervisor")[0]["message"]

    killing = write_program(tmp_path / "kill.conf", "stopwaitsecs=400", "stopsignal=KILL")
    code, findings, _ = doctor(
        "--url", sqlite_url(tmp_path), "--config", str(PRODUCTION), "--supervisor-conf",
        str(killing),
    )  # fmt: skip
    assert code == 1
    statuses = [(f["status"], f["message"]) for f in by_check(findings, "supervisor")]
    assert statuses[0][0] == "ok" and statuses[1][0] == "problem" and "KILL" in statuses[1][1]


def test_a_supervisor_log_directory_that_does_not_exist_is_flagged(
    doctor: Doctor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "logs").mkdir()
    conf = write_program(
        tmp_path / "logs.conf",
        "stopwaitsecs=400",
        f"stdout_logfile={tmp_path}/missing/%(program_name)s_%(process_num)02d.log",
        "stderr_logfile=%(ENV_DOCTOR_TEST_HOME)s/logs/%(program_name)s.err",
    )
    args = ("--url", sqlite_url(tmp_path), "--config", str(PRODUCTION))
    monkeypatch.setenv("DOCTOR_TEST_HOME", str(tmp_path))
    code, findings, _ = doctor(*args, "--supervisor-conf", str(conf))
    monkeypatch.delenv("DOCTOR_TEST_HOME")
    assert code == 1
    (problem,) = by_check(findings, "supervisor logs")
    assert problem["status"] == "problem"
    assert f"directory {tmp_path}/missing does not exist" in problem["message"]
    assert f"mkdir -p {tmp_path}/missing" in (problem["fix"] or "")
    assert "conveyor-worker_00.log" in problem["message"]  # expanded as supervisor does

    code, findings, _ = doctor(*args, "--supervisor-conf", str(conf))  # $DOCTOR_TEST_HOME unset
    (unknown,) = by_check(findings, "supervisor logs")
    assert unknown["status"] == "unchecked" and "ENV_DOCTOR_TEST_HOME" in unknown["message"]


def test_start_retries_that_give_up_during_an_outage_are_flagged(
    doctor: Doctor, tmp_path: Path
) -> None:
    # The old shipped pair, with a worker that does not wait for its broker.
    quitter = write_program(
        tmp_path / "quitter.conf",
        "stopwaitsecs=400",
        "startsecs=3",
        "startretries=5",
        f'environment=CONVEYOR_CONFIG="{PRODUCTION}",CONVEYOR_WORKER__BROKER_WAIT="0"',
    )
    args = ("--url", sqlite_url(tmp_path))
    code, findings, text = doctor(*args, "--supervisor-conf", str(quitter))
    assert code == 1
    (finding,) = by_check(findings, "supervisor starts")
    assert finding["status"] == "problem"
    message = finding["message"]
    assert "startsecs=3s, startretries=5" in message and "after 6 starts" in message
    assert "about 33s" in message and "1 + 2 + 3 + 4 + 5 s" in message
    assert "outage longer than about 33s leaves these workers FATAL" in message
    assert "CONVEYOR_WORKER__BROKER_WAIT" in message
    assert "worker.broker_wait: forever" in (finding["fix"] or "")
    assert "startretries=22" in (finding["fix"] or "")  # keeps trying for 300 s
    assert "PROBLEM    supervisor starts" in text

    # The same pair with a worker that waits (production.yaml: forever) is fine.
    waiter = write_program(
        tmp_path / "waiter.conf",
        "stopwaitsecs=400",
        "startsecs=3",
        "startretries=5",
        f'environment=CONVEYOR_CONFIG="{PRODUCTION}"',
    )
    code, findings, _ = doctor(*args, "--supervisor-conf", str(waiter))
    (finding,) = by_check(findings, "supervisor starts")
    assert finding["status"] == "ok" and "an outage is never a failed start" in finding["message"]
    assert code == 0

    # A worker that gives up, but a supervisor that keeps trying for 5 minutes: fine too.
    patient = write_program(
        tmp_path / "patient.conf",
        "stopwaitsecs=400",
        "startsecs=3",
        "startretries=22",
        f'environment=CONVEYOR_CONFIG="{PRODUCTION}",CONVEYOR_WORKER__BROKER_WAIT="1"',
    )
    code, findings, _ = doctor(*args, "--supervisor-conf", str(patient))
    assert by_check(findings, "supervisor starts")[0]["status"] == "ok"


def test_the_shipped_supervisor_and_compose_files_pass(doctor: Doctor, tmp_path: Path) -> None:
    code, findings, _ = doctor(
        "--url", sqlite_url(tmp_path), "--supervisor-conf",
        str(ROOT / "supervisor/conveyor-worker.conf"), "--compose",
        str(ROOT / "docker-compose.yml"),
    )  # fmt: skip
    assert code == 0, findings
    checks = {f["check"]: f for f in findings}
    assert checks["supervisor"]["status"] == "ok" and "330s" in checks["supervisor"]["message"]
    # logs/ ships with the checkout (CONVEYOR_HOME is unset here: taken as the checkout).
    assert checks["supervisor logs"]["status"] == "ok"
    assert str(ROOT / "logs") in checks["supervisor logs"]["message"]
    assert checks["supervisor starts"]["status"] == "ok"
    assert "waits for its broker (forever" in checks["supervisor starts"]["message"]
    compose = [f for f in findings if f["check"] == "compose"]  # worker, worker-postgres
    assert {f["status"] for f in compose} == {"ok"} and len(compose) == 2
    assert any("service worker: " in f["message"] and "production.yaml" in f["message"]
               for f in compose)  # fmt: skip
    assert any("postgres.yaml" in f["message"] for f in compose)
    assert checks["compose redis"]["status"] == "ok"


def test_a_running_supervisord_is_checked_over_xml_rpc(doctor: Doctor, tmp_path: Path) -> None:
    if not supervisord_installed():
        unavailable("supervisord is not installed: pip install -e '.[dev]'")
    program = {
        "command": f"{sys.executable} {ROOT / 'worker.py'}",
        "autostart": "false",  # only its settings matter: nothing needs to run
        "stopwaitsecs": "5",
        "stdout_logfile": f"{tmp_path}/no-such-dir/worker.log",
    }
    # supervisord refuses a config whose log directory is missing; one removed later (a
    # log cleanup, a fresh volume) is found only when a process starts.
    (tmp_path / "no-such-dir").mkdir()
    supervisord = Supervisord(tmp_path / "sv", {"conveyor-worker": program}, {})
    (tmp_path / "no-such-dir").rmdir()
    try:
        args = ("--url", sqlite_url(tmp_path), "--config", str(PRODUCTION))
        code, findings, _ = doctor(*args, "--supervisor-url", supervisord.url)
        assert code == 1
        (finding,) = by_check(findings, "supervisord")
        assert finding["status"] == "problem" and "stopwaitsecs is 5s" in finding["message"]
        (logs,) = by_check(findings, "supervisord logs")
        assert logs["status"] == "problem" and f"{tmp_path}/no-such-dir" in logs["message"]
        (starts,) = by_check(findings, "supervisord starts")
        assert starts["status"] == "ok" and "startsecs=1s, startretries=3" in starts["message"]
    finally:
        supervisord.stop()
    code, findings, _ = doctor(*args, "--supervisor-url", supervisord.url)  # now gone
    assert code == 1
    assert "cannot ask supervisord" in by_check(findings, "supervisord")[0]["message"]


# -- docker-compose ---------------------------------------------------------------------------


def test_a_compose_grace_period_shorter_than_the_drain_is_flagged(
    doctor: Doctor, tmp_path: Path
) -> None:
    compose = tmp_path / "compose.yml"
    compose.write_text(
        "services:\n"
        "  redis:\n    image: redis:7\n    command: redis-server\n"
        "  worker:\n    build: .\n    command: [conveyor, worker]\n"
        "    stop_grace_period: 10s\n"
        f"    environment:\n      CONVEYOR_CONFIG: {PRODUCTION}\n"
    )
    code, findings, _ = doctor("--url", sqlite_url(tmp_path), "--compose", str(compose))
    assert code == 1
    (grace,) = by_check(findings, "compose")
    assert grace["status"] == "problem"
    assert "stop_grace_period is 10s" in grace["message"] and "300s" in grace["message"]
    (redis_service,) = by_check(findings, "compose redis")
    assert redis_service["status"] == "problem" and "appendonly" in redis_service["message"]

    compose.write_text(
        "services:\n  worker:\n    image: conveyor\n    stop_grace_period: 1m\n"
        "    environment: [CONVEYOR_WORKER__MAX_SHUTDOWN_WAIT=90]\n"
    )
    code, findings, _ = doctor("--url", sqlite_url(tmp_path), "--compose", str(compose))
    assert code == 1
    assert "90s" in by_check(findings, "compose")[0]["message"]


def test_durations_as_compose_writes_them() -> None:
    assert parse_duration("330s") == 330
    assert parse_duration("5m30s") == 330
    assert parse_duration("1h") == 3600
    assert parse_duration("1.5m") == 90
    assert parse_duration("500ms") == 0.5
    assert parse_duration(45) == 45
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("five minutes")


# -- RabbitMQ's consumer_timeout --------------------------------------------------------------


def test_a_pipeline_limit_above_rabbitmqs_consumer_timeout_is_flagged(
    doctor: Doctor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker closes a channel that holds a delivery past consumer_timeout (1,800 s by
    default) and delivers the task again mid-run: a longer limit, or none, is a problem."""
    from conftest import rabbitmq_url, require_rabbitmq_server

    require_rabbitmq_server()
    (tmp_path / "doctor_pipelines.py").write_text(
        "from conveyor import Pipeline\n"
        "fits = Pipeline('fits', timeout=60)\n"
        "fits.step(lambda ctx: None, name='a')\n"
        "too_long = Pipeline('too_long', timeout=7200)\n"
        "too_long.step(lambda ctx: None, name='a')\n"
        "unbounded = Pipeline('unbounded')\n"
        "unbounded.step(lambda ctx: None, name='a')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CONVEYOR_WORKER__PIPELINES", "doctor_pipelines")
    code, findings, _ = doctor("--url", rabbitmq_url(tmp_path), "--no-files")
    timeouts = {f["message"].split(":")[0]: f for f in by_check(findings, "rabbitmq timeout")}
    assert code == 1, findings
    assert timeouts["pipeline 'fits'"]["status"] == "ok"
    assert timeouts["pipeline 'too_long'"]["status"] == "problem"
    assert "7200" in timeouts["pipeline 'too_long'"]["message"]
    assert timeouts["pipeline 'unbounded' has no hard time limit"]["status"] == "problem"
