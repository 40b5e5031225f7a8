"""Cron schedules: DST rules, missed ticks, exactly-once pushes from many schedulers, the
registry's view (conflicts), and a real-time run of workers with a schedule every second.

The exactly-once test runs three scheduler processes on a fake clock the test steps through
200 ticks, while it consumes and finishes the tasks (so a finished record could be replaced
by a second push if the claim of a tick were not atomic); each process writes what it
pushed to a ledger, and each tick must appear exactly once in it.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from conftest import HELPERS, backend_params, wait_until
from conveyor import ConfigError, Pipeline, QueueManager
from conveyor.doctor.schedules import check_schedules
from conveyor.schedules import Schedule, Scheduler
from conveyor.schedules.listing import conflicts, list_schedules
from conveyor.settings import load_settings
from helpers.worker_process import WorkerProcess

MakeQueue = Callable[..., QueueManager]
PARIS = ZoneInfo("Europe/Paris")


def paris(*args: int) -> float:
    return datetime(*args, tzinfo=PARIS).timestamp()  # type: ignore[misc]


def local(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, PARIS).strftime("%m-%d %H:%M%z")


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _scheduler(queue: QueueManager, schedules: list[Schedule], clock: FakeClock,
               writer: str = "test") -> Scheduler:  # fmt: skip
    return Scheduler(schedules, lambda name: queue, writer=writer, clock=clock)


def _run_through(scheduler: Scheduler, clock: FakeClock, until: float, step: float) -> list[str]:
    pushed = []
    while clock.now < until:
        clock.now = min(clock.now + step, until)
        pushed += [p.task_id for p in scheduler.run_pending()]
    return pushed


# -- daylight-saving time (Europe/Paris, 2026) -------------------------------------------------


def test_a_time_the_spring_change_skips_runs_once_at_the_first_valid_time_after() -> None:
    """29 March 2026: 02:00 -> 03:00. A 02:30 job runs at 03:00 that day, once."""
    schedule = Schedule("s", "30 2 * * *", tz="Europe/Paris")
    ticks = [local(t) for t in _take(schedule.ticks_after(paris(2026, 3, 28, 0, 0)), 3)]
    assert ticks == ["03-28 02:30+0100", "03-29 03:00+0200", "03-30 02:30+0200"]
    hourly = Schedule("h", "15 * * * *", tz="Europe/Paris")  # a wildcard hour: no 02:15
    ticks = [local(t) for t in _take(hourly.ticks_after(paris(2026, 3, 29, 1, 0)), 2)]
    assert ticks == ["03-29 01:15+0100", "03-29 03:15+0200"]


def test_a_time_the_autumn_change_repeats_runs_once() -> None:
    """25 October 2026: 03:00 -> 02:00. A 02:30 job runs once, at the first 02:30."""
    schedule = Schedule("s", "30 2 * * *", tz="Europe/Paris")
    ticks = [local(t) for t in _take(schedule.ticks_after(paris(2026, 10, 24, 0, 0)), 3)]
    assert ticks == ["10-24 02:30+0200", "10-25 02:30+0200", "10-26 02:30+0100"]


def test_the_scheduler_pushes_across_both_changes_with_a_fake_clock(tmp_path: Path) -> None:
    with QueueManager.from_url(f"sqlite:///{tmp_path / 'dst.db'}", queue_name="q") as queue:
        schedule = Schedule("dst", "30 2 * * *", queue="q", tz="Europe/Paris", grace=7200)
        for start, days in ((paris(2026, 3, 27, 12, 0), 4), (paris(2026, 10, 23, 12, 0), 4)):
            clock = FakeClock(start)
            scheduler = _scheduler(queue, [schedule], clock)
            pushed = _run_through(scheduler, clock, start + days * 86400, step=600)
            moments = [local(float(task_id.rsplit(":", 1)[1])) for task_id in pushed]
            assert len(moments) == len(set(moments)) == days, moments
            if start < paris(2026, 6, 1):
                assert "03-29 03:00+0200" in moments, moments
            else:
                assert "10-25 02:30+0200" in moments and not any(
                    m.startswith("10-25") and m.endswith("+0100") for m in moments
                ), moments


def _take(iterator: object, n: int) -> list[float]:
    it = iter(iterator)  # type: ignore[call-overload]
    return [next(it) for _ in range(n)]


# -- missed ticks --------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["skip", "run_once"])
def test_ticks_missed_while_no_scheduler_ran_follow_the_policy(policy: str, tmp_path: Path) -> None:
    """A minute schedule; schedulers run 10 ticks, are down for 5, then come back."""
    with QueueManager.from_url(f"sqlite:///{tmp_path / 'm.db'}", queue_name="q") as queue:
        schedule = Schedule("m", "* * * * *", queue="q", missed=policy, grace=30)  # type: ignore[arg-type]
        base = 1_800_000_000 - 1_800_000_000 % 60
        clock = FakeClock(base + 1)
        first = _run_through(_scheduler(queue, [schedule], clock), clock, base + 10 * 60 + 1, 5)
        assert first == [f"cron:m:{base + 60 * k}" for k in range(1, 11)]
        clock.now = base + 15 * 60 + 45  # back after ticks 11..15 were missed (+45 s: late)
        back = _scheduler(queue, [schedule], clock, writer="restarted")
        again = [p for p in back.run_pending()]
        later = _run_through(back, clock, base + 18 * 60 + 1, 5)
        if policy == "skip":
            assert again == [], again
        else:
            assert [(p.task_id, p.missed) for p in again] == [(f"cron:m:{base + 15 * 60}", True)]
        assert later == [f"cron:m:{base + 60 * k}" for k in (16, 17, 18)]
        for k in range(11, 15):
            assert queue.get_task(f"cron:m:{base + 60 * k}") is None


# -- exactly once, three scheduler processes --------------------------------------------------


def _write_clock(path: Path, text: str) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text(text)
    os.replace(temp, path)


@pytest.mark.parametrize("backend_name", backend_params())
def test_three_schedulers_push_each_of_200_ticks_exactly_once(
    make_queue: MakeQueue, backend_url: str, queue_name: str, tmp_path: Path
) -> None:
    queue = make_queue()
    clock_file, ledger = tmp_path / "clock", tmp_path / "ledger"
    base = 1_800_000_000
    _write_clock(clock_file, f"{base + 0.5}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HELPERS / "run_scheduler.py"),
                backend_url,
                queue_name,
                str(clock_file),
                str(ledger),
                f"scheduler{i}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for k in range(1, 201):
            _write_clock(clock_file, f"{base + k + 0.5}")
            task_id = f"cron:tick-{queue_name}:{base + k}"
            wait_until(lambda t=task_id: queue.get_task(t) is not None, timeout=60,  # type: ignore[misc]
                       message=f"tick {k} pushed")  # fmt: skip
            while (message := queue.reserve(timeout=0)) is not None:  # finish what is there
                queue.ack(message)
        time.sleep(0.3)  # let every scheduler see the last tick (and refuse it)
        _write_clock(clock_file, "stop")
        for proc in procs:
            proc.wait(30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        queue.server.registry.forget_schedule(f"tick-{queue_name}")  # the shared Redis
    lines = [line.split() for line in ledger.read_text().splitlines()]
    per_tick = Counter(task_id for task_id, _, _ in lines)
    per_scheduler = Counter(name for _, _, name in lines)
    print(f"\nledger [{queue.backend_kind.value}]: {len(lines)} pushes for 200 ticks; "
          f"by scheduler {dict(per_scheduler)}; ticks pushed twice: "
          f"{[t for t, n in per_tick.items() if n > 1]}")  # fmt: skip
    assert sorted(per_tick) == sorted(f"cron:tick-{queue_name}:{base + k}" for k in range(1, 201))
    assert set(per_tick.values()) == {1}
    counts = queue.stats().counts
    assert counts["success"] + counts["pending"] == 200, counts


# -- the registry: definitions, conflicts, the last run ------------------------------------------


def test_every_scheduler_writes_its_definitions_and_conflicts_are_reported(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with QueueManager.from_url(url, queue_name="q") as queue:
        clock = FakeClock(1_800_000_000.5)
        one = Schedule("report", "0 9 * * MON-FRI", queue="q", tz="Europe/Paris", priority=7)
        other = Schedule("report", "0 10 * * *", queue="q")
        _scheduler(queue, [one], clock, writer="host-a").run_pending()
        entries = list_schedules(queue)
        assert [(e["name"], e["cron"], e["tz"], e["writers"]) for e in entries] == [
            ("report", "0 9 * * MON-FRI", "Europe/Paris", ["host-a"])
        ]
        assert entries[0]["next_run"] == one.next_after(clock.now) and not conflicts(entries)
        _scheduler(queue, [other], clock, writer="host-b").run_pending()
        entries = list_schedules(queue)
        assert (
            len(entries[0]["conflict"]) == 2 and "2 different definitions" in conflicts(entries)[0]
        )
        settings = load_settings(None, url=url)
        findings = check_schedules(settings)
        assert [f.status for f in findings] == ["problem"]


def test_schedules_are_checked_where_they_are_declared() -> None:
    with pytest.raises(ConfigError, match="bad cron expression"):
        Schedule("x", "61 * * * *")
    with pytest.raises(ConfigError, match="unknown time zone"):
        Schedule("x", "* * * * *", tz="Mars/Olympus")
    with pytest.raises(ConfigError, match="missed must be one of"):
        Schedule("x", "* * * * *", missed="twice")  # type: ignore[arg-type]
    pipeline = Pipeline("meeting")
    pipeline.schedule("0 9 * * MON-FRI", data={"room": 1}, tz="Europe/Paris", priority=7)
    assert pipeline.schedules[0]["name"] == "meeting:0 9 * * MON-FRI"
    with pytest.raises(ConfigError):
        pipeline.schedule("not cron")


# -- real time: workers run a schedule every second for about 20 s ----------------------------


@pytest.mark.parametrize("backend_name", backend_params("sqlite", "redis"))
def test_two_workers_run_a_schedule_every_second_for_twenty_seconds(
    make_queue: MakeQueue, backend_url: str, queue_name: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "runs.txt"
    queue = make_queue()
    schedules = [{"name": f"tick-{queue_name}", "cron": "* * * * * *", "queue": queue_name,
                  "type": "flow", "data": {"ledger": str(ledger)}, "grace": 5}]  # fmt: skip
    env = {"CONVEYOR_SCHEDULES": json.dumps(schedules)}
    workers = [
        WorkerProcess(
            tmp_path / f"w{i}", backend_url, "-P", "flow_pipeline", "-Q", queue_name, env=env
        )
        for i in range(2)
    ]
    try:
        for worker in workers:
            worker.wait_for("scheduler: running 1 schedule(s)")
        started = time.time()
        wait_until(lambda: time.time() - started > 20, timeout=30, interval=0.5)
        for worker in workers:
            worker.signal()
        for worker in workers:
            assert worker.wait(60) == 0
    finally:
        for worker in workers:
            worker.kill()
        queue.server.registry.forget_schedule(f"tick-{queue_name}")
    ids = [line.split()[1] for line in ledger.read_text().splitlines() if line.startswith("E ")]
    ticks = sorted(int(task_id.rsplit(":", 1)[1]) for task_id in ids)
    runs = Counter(ids)
    gaps = [b - a for a, b in itertools.pairwise(ticks) if b - a != 1]
    print(f"\nreal time [{queue.backend_kind.value}, machine loaded]: {len(ticks)} ticks run, "
          f"{ticks[-1] - ticks[0] + 1} seconds covered, gaps {gaps}, run twice "
          f"{[t for t, n in runs.items() if n > 1]}")  # fmt: skip
    assert len(ticks) >= 15 and set(runs.values()) == {1}
    assert not gaps, gaps  # grace 5 s: a loaded machine's late pass still pushes each tick


# -- where they are seen: CLI and API (and the XQueue body of per-key limits) ------------------


def test_the_cli_and_the_api_list_schedules_and_accept_keyed_pushes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from api_support import clear_conveyor_env, client_factory
    from conveyor.cli import main

    clear_conveyor_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'api.db'}"
    with QueueManager.from_url(url, queue_name="q") as queue:
        clock = FakeClock(1_800_000_000.5)
        schedule = Schedule("nightly", "0 3 * * *", queue="q", tz="Europe/Paris")
        _scheduler(queue, [schedule], clock, writer="host-a").run_pending()
    assert main(["schedules", "--url", url]) == 0
    listing = capsys.readouterr().out
    assert "nightly" in listing and "Europe/Paris" in listing and "host-a" in listing
    assert main(["push", '{"n": 1}', "--url", url, "-q", "q", "--concurrency-key", "user_1",
                 "--max-concurrency", "2", "--retry-backoff", "60,300,900"]) == 0  # fmt: skip
    task_id = capsys.readouterr().out.strip()
    factory = client_factory(url, "q")
    make = next(factory)
    client = make()
    body = client.get("/api/v1/schedules").json()
    assert [s["name"] for s in body["schedules"]] == ["nightly"]
    assert body["schedules"][0]["next_run"] == schedule.next_after(clock.now)
    created = client.post("/api/v1/tasks", json={
        "payload": {"n": 2}, "concurrency_key": "user_123", "max_concurrency": 5,
        "retry_backoff": [60, 300],
    })  # fmt: skip
    assert created.status_code == 201, created.text
    record = client.get(f"/api/v1/tasks/{created.json()['id']}").json()
    assert (record["concurrency_key"], record["max_concurrency"]) == ("user_123", 5)
    assert record["retry_backoff"] == [60.0, 300.0]
    cli_record = client.get(f"/api/v1/tasks/{task_id}").json()
    assert cli_record["retry_backoff"] == [60.0, 300.0, 900.0]
    assert cli_record["concurrency_key"] == "user_1"
    for _ in factory:
        pass
