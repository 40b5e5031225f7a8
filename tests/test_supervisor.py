"""supervisor/conveyor-worker.conf under a real supervisord, with three workers on Redis.

The program section is the shipped one, read from the file: its command, process_name,
numprocs, stopsignal, stopwaitsecs, autorestart and stopasgroup are used as written, with
CONVEYOR_HOME pointing at this checkout. Only what a test must change is overridden: the
log file, and environment entries for the test's Redis, queue, pipeline and short timers
(a 0.5 s heartbeat, a 3 s lease so a killed worker's task comes back quickly).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import HELPERS, REDIS_URL, require_redis_server, unavailable, wait_until
from conveyor import QueueManager
from conveyor.cli import main
from conveyor.doctor.starts import give_up_seconds
from conveyor.errors import ConveyorError
from helpers.private_redis import PrivateRedis
from helpers.supervision import (
    ROOT,
    Supervisord,
    fresh_checkout,
    program_section,
    supervisor_env,
    supervisord_installed,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CONVEYOR = Path(sys.executable).parent / "conveyor"
PROCESSES = ("conveyor-worker_00", "conveyor-worker_01", "conveyor-worker_02")


class Deployment:
    """supervisord running the shipped program, and a manager on the workers' queue.

    ``home`` is the checkout the program runs from (CONVEYOR_HOME); with ``shipped_logs``
    the log files stay where the shipped program puts them (``home/logs/``), otherwise
    they go to ``workdir``. The manager opens on first use (the broker may be down).
    """

    def __init__(
        self, workdir: Path, url: str, home: Path = ROOT, *, shipped_logs: bool = False
    ) -> None:
        self.url = url
        self.home = home
        self.queue_name = f"sv-{uuid.uuid4().hex[:8]}"
        program = program_section()
        env = {
            "CONVEYOR_URL": url, "CONVEYOR_QUEUE__NAME": self.queue_name,
            "CONVEYOR_WORKER__QUEUES": self.queue_name, "CONVEYOR_WORKER__CONCURRENCY": "1",
            "CONVEYOR_WORKER__PIPELINES": "ops_pipeline", "PYTHONPATH": str(HELPERS),
            "CONVEYOR_WORKER__HEARTBEAT_INTERVAL": "0.5",
            "CONVEYOR_QUEUE__VISIBILITY_TIMEOUT": "3",
            "CONVEYOR_LOGGING__JSON": "false",
        }  # fmt: skip
        if not shipped_logs:
            env["CONVEYOR_LOGGING__FILE"] = str(workdir / "worker_%(process_num)02d.log")
            program["stdout_logfile"] = str(workdir / "%(program_name)s_%(process_num)02d.out")
        # The shipped environment first; later keys win in supervisor's parser.
        program["environment"] = program["environment"] + "," + supervisor_env(env)
        self.program = program
        self._queue: QueueManager | None = None
        self.supervisord = Supervisord(
            workdir, {"conveyor-worker": program}, {"CONVEYOR_HOME": str(home)}
        )

    @property
    def queue(self) -> QueueManager:
        if self._queue is None:
            self._queue = QueueManager.from_url(
                self.url, queue_name=self.queue_name, visibility_timeout=3
            )
        return self._queue

    def workers(self) -> list[dict[str, Any]]:
        return [w for w in self.queue.workers() if w.get("queues") == [self.queue_name]]

    def wait_for_workers(self, count: int = 3, exclude: set[str] = frozenset()) -> set[str]:
        """Ids of ``count`` live workers (beyond ``exclude``), waiting for their heartbeats."""

        def ready() -> set[str]:
            ids = {str(w["id"]) for w in self.workers() if str(w["id"]) not in exclude}
            return ids if len(ids) >= count else set()

        return wait_until(ready, timeout=60, message=self.why(f"{count} workers"))

    def wait_running(self) -> dict[str, tuple[str, int | None]]:
        """supervisor's view once every process is RUNNING (it waits startsecs for that)."""

        def running() -> dict[str, tuple[str, int | None]]:
            found = self.supervisord.status()
            ok = len(found) == 3 and all(state == "RUNNING" for state, _ in found.values())
            return found if ok else {}

        return wait_until(running, timeout=30, message=self.why("every process RUNNING"))

    def running_tasks(self, count: int) -> list[Any]:
        def running() -> list[Any]:
            records = self.queue.list_tasks("processing", limit=100)
            return records if len({r.worker for r in records}) == count else []

        return wait_until(running, timeout=30, message=self.why(f"{count} running tasks"))

    def why(self, what: str) -> Callable[[], str]:
        return lambda: f"{what}; supervisord log:\n{self.supervisord.log()[-3000:]}"

    def close(self) -> None:
        self.supervisord.stop()
        if self._queue is not None:
            with contextlib.suppress(ConveyorError):
                self._queue.clear()
            self._queue.close()


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Callable[..., Deployment]]:
    if not supervisord_installed():
        unavailable("supervisord is not installed: pip install -e '.[dev]'")
    started: list[Deployment] = []

    def start(url: str, home: Path = ROOT, *, shipped_logs: bool = False) -> Deployment:
        deployment = Deployment(tmp_path / f"d{len(started)}", url, home, shipped_logs=shipped_logs)
        started.append(deployment)
        return deployment

    yield start
    for deployment in started:
        deployment.close()


@pytest.fixture
def on_redis(deploy: Callable[..., Deployment]) -> Deployment:
    require_redis_server()
    return deploy(REDIS_URL)


def test_three_supervised_workers_share_300_tasks(
    on_redis: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = on_redis.wait_for_workers(3)
    states = on_redis.wait_running()
    assert {name.split(":")[-1] for name in states} == set(PROCESSES)
    on_redis.queue.push_many(
        [{"task_id": f"t{i}", "data": {"sleep": 0.01}, "priority": i % 11} for i in range(300)]
    )
    wait_until(
        lambda: on_redis.queue.stats().counts["success"] == 300,
        timeout=90,
        message=lambda: f"300 successes; counts {on_redis.queue.stats().counts}",
    )
    records = on_redis.queue.list_tasks("success", limit=1000)
    assert len(records) == 300
    assert {record.worker for record in records} == ids  # each of the three took some
    counts = on_redis.queue.stats().counts
    assert counts["success"] == 300 and sum(counts.values()) == 300

    # The doctor reads the running supervisord's settings over XML-RPC.
    production = str(ROOT / "config/production.yaml")
    args = ["--url", REDIS_URL, "--no-files", "--config", production, "--json"]
    assert main(["doctor", *args, "--supervisor-url", on_redis.supervisord.url]) in (0, 1)
    findings = json.loads(capsys.readouterr().out)["findings"]
    (supervisord,) = [f for f in findings if f["check"] == "supervisord"]
    assert supervisord["status"] == "ok" and "stopwaitsecs 330s" in supervisord["message"]


def test_supervisorctl_stop_waits_for_running_tasks(on_redis: Deployment) -> None:
    on_redis.wait_for_workers(3)
    on_redis.wait_running()
    on_redis.queue.push_many([(f"slow{i}", {"sleep": 3}, 5) for i in range(3)])
    on_redis.running_tasks(3)  # one 3 s task on each worker
    done = on_redis.supervisord.ctl("stop", "all", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    states = on_redis.supervisord.status()
    assert [state for state, _ in states.values()] == ["STOPPED"] * 3
    log = on_redis.supervisord.log()
    for name in PROCESSES:
        assert re.search(rf"stopped: {name} \(exit status 0\)", log), log
    assert "SIGKILL" not in log
    for i in range(3):
        record = on_redis.queue.require_task(f"slow{i}")
        assert record.status.value == "success", record
        assert record.attempts == 1
    counts = on_redis.queue.stats().counts
    assert counts["success"] == 3 and sum(counts.values()) == 3  # nothing lost or left


def test_a_sigkilled_worker_is_restarted_and_its_task_completes(on_redis: Deployment) -> None:
    on_redis.wait_for_workers(3)
    states = on_redis.wait_running()
    on_redis.queue.push("victim", {"sleep": 3}, 5)
    (record,) = on_redis.running_tasks(1)
    (info,) = [w for w in on_redis.workers() if w["id"] == record.worker]
    name = next(n for n, (_, pid) in states.items() if pid == info["pid"])
    os.kill(int(info["pid"]), signal.SIGKILL)

    def restarted() -> bool:
        state, pid = on_redis.supervisord.status()[name]
        return state == "RUNNING" and pid not in (None, info["pid"])

    wait_until(restarted, timeout=30, message=lambda: on_redis.supervisord.log()[-2000:])
    assert f"exited: {name.split(':')[-1]} (terminated by SIGKILL; not expected)" in (
        on_redis.supervisord.log()
    )
    final = wait_until(
        lambda: (r := on_redis.queue.require_task("victim")).status.value == "success" and r,
        timeout=30,
        message="the killed worker's task to be redelivered and finish",
    )
    assert final.attempts == 2 and final.worker != record.worker


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own: "stop every worker" must not reach other tests'."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    server = PrivateRedis(tmp_path / "redis")
    yield server
    server.stop()


def test_conveyor_stop_drains_every_worker(
    private_server: PrivateRedis, deploy: Callable[..., Deployment]
) -> None:
    server = private_server
    deployment = deploy(server.url)
    first = deployment.wait_for_workers(3)
    deployment.wait_running()  # an exit before startsecs would count as a failed start
    deployment.queue.push_many([(f"s{i}", {"sleep": 2}, 5) for i in range(3)])
    deployment.running_tasks(3)
    done = subprocess.run(
        [str(CONVEYOR), "stop", "--all", "--url", server.url, "--wait", "60"],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "asked 3 worker(s) to stop gracefully" in done.stdout
    assert "3 worker(s) exited" in done.stdout
    for i in range(3):
        assert deployment.queue.require_task(f"s{i}").status.value == "success"
    # A worker leaves the registry just before its process ends: poll supervisor's log.
    log = wait_until(
        lambda: (
            (text := deployment.supervisord.log())
            and all(f"exited: {name} (exit status 0; expected)" in text for name in PROCESSES)
            and text
        ),
        timeout=30,
        message=deployment.why("three clean exits"),
    )
    assert "SIGKILL" not in log
    # autorestart: supervisor starts fresh workers, which the old request does not stop.
    fresh = deployment.wait_for_workers(3, exclude=first)
    assert not fresh & first


# -- a broker outage at start -------------------------------------------------------------------


def test_the_shipped_program_from_a_fresh_checkout_rides_out_a_long_redis_outage(
    deploy: Callable[..., Deployment], private_redis: Callable[..., PrivateRedis], tmp_path: Path
) -> None:
    """Redis is down for longer than supervisor's start retries last (startsecs x
    (startretries + 1) plus its 1 + 2 + ... s backoff: about 26 s with the old 3 s / 5
    retries, which left every worker FATAL). The workers wait for Redis instead of exiting,
    stay RUNNING with the same pids throughout, and drain the queue once Redis is up.

    The program is the shipped one, run from a fresh checkout (only the files git tracks)
    with its own log files: supervisor opens them in logs/, which must be in the checkout.
    """
    try:
        home = fresh_checkout(tmp_path / "checkout")
    except RuntimeError as exc:
        unavailable(str(exc))
    server = private_redis(aof=True, start=False)  # its port is known; it is not running
    deployment = deploy(server.url, home, shipped_logs=True)
    startsecs = float(deployment.program["startsecs"])
    retries = int(deployment.program["startretries"])
    outage = max(give_up_seconds(startsecs, retries), 26.0) + 4.0
    began = time.monotonic()
    pids: dict[str, int | None] = {}
    seen: set[str] = set()
    while (elapsed := time.monotonic() - began) < outage:
        states = deployment.supervisord.status()
        seen |= {state for state, _ in states.values()}
        assert seen <= {"STARTING", "RUNNING"}, deployment.why(f"no exit after {elapsed:.0f}s")()
        if elapsed > startsecs + 5:  # supervisor has had time to call them started
            assert [state for state, _ in states.values()] == ["RUNNING"] * 3, states
            pids = pids or {name: pid for name, (_, pid) in states.items()}
            assert {name: pid for name, (_, pid) in states.items()} == pids  # never restarted
        time.sleep(0.5)
    log = deployment.supervisord.log()
    assert "FATAL" not in log and "BACKOFF" not in log and "exited:" not in log, log
    for number in range(3):
        text = (home / "logs" / f"worker_{number:02d}.log").read_text()
        assert text.count("waiting for the backend") == 1, text
        assert (home / "logs" / f"conveyor-worker_{number:02d}.log").exists()

    server.start()
    up = time.monotonic()
    deployment.wait_for_workers(3)
    resumed = time.monotonic() - up
    deployment.queue.push_many([(f"o{i}", {"sleep": 0.05}, 5) for i in range(30)])
    wait_until(
        lambda: deployment.queue.stats().counts["success"] == 30,
        timeout=60,
        message=lambda: f"30 successes; counts {deployment.queue.stats().counts}",
    )
    counts = deployment.queue.stats().counts
    assert sum(counts.values()) == 30  # nothing lost, nothing left
    assert {name: pid for name, (_, pid) in deployment.supervisord.status().items()} == pids
    print(
        f"Redis down {outage:.0f}s with the shipped program (startsecs={startsecs:g}, "
        f"startretries={retries}); all 3 workers registered {resumed:.1f}s after Redis started"
    )
