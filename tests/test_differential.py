"""One behaviour: a seeded random script of public-API calls gives the same results everywhere.

Each seed's script (``differential_script``) is played on SQLite and on Redis at the same
planned times, and compared call by call: every return value, every reserved id (with its
attempt number), then every task's final ``(status, attempts, dead_reason)``. RabbitMQ's
lease is its unacked delivery on a live connection, not a visibility timeout, so it plays a
second script of the seed in which no lease runs out, and SQLite plays that script beside it.

Timing: the scripts put every deadline a quarter or half tick away from the ticks at which
calls happen, and each play checks how late each call finished. A divergence after a call
that ran too late to trust (closer than ``MARGIN`` to a deadline) is not reported: that seed
is played again, with only the other such seeds, at ticks twice as long, then four times.

All plays run at once, each seed pair in its own threads (one manager per thread; managers
are not thread-safe) and at its own phase within the tick, so the file takes about as long
as one script. Reproduce one seed::

    CONVEYOR_DIFF_SEED=7 pytest tests/test_differential.py -k redis
    CONVEYOR_DIFF_SEED=7 CONVEYOR_DIFF_VERBOSE=1 pytest -s tests/test_differential.py

``CONVEYOR_DIFF_SEEDS=N`` plays seeds 0..N-1 (default 30); ``CONVEYOR_DIFF_TICK`` sets the
tick in seconds (default 1.0).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import (
    REDIS_URL,
    _delete_redis_keys,
    backend_params,
    delete_rabbitmq_queues,
    rabbitmq_url,
    require_postgres_server,
    require_rabbitmq_server,
    require_redis_server,
    sleep_until,
)
from conveyor import Message, QueueManager
from differential_script import MAX_DELIVERIES, MESSAGE_OPS, Op, Script, generate

TICK_SECONDS = float(os.environ.get("CONVEYOR_DIFF_TICK", "1.0"))
#: The least distance kept between a timing decision and the time it depends on.
MARGIN = 0.15
#: Visibility timeout of the scripts in which no lease may run out (longer than any script).
NO_EXPIRY_LEASE = 3600.0
#: Tick multipliers for a seed whose divergence came after a call that ran too late.
RETRY_SCALES = (2.0, 4.0)
REFERENCE = "sqlite"
#: The session's PostgreSQL database, once a selected job needs it (see ``results``).
POSTGRES_URLS: list[str] = []
_REQUIRE = {
    "redis": require_redis_server,
    "rabbitmq": require_rabbitmq_server,
    "postgres": require_postgres_server,
}


def _seeds() -> list[int]:
    one = os.environ.get("CONVEYOR_DIFF_SEED", "").strip()
    if one:
        return [int(part) for part in one.split(",")]
    return list(range(int(os.environ.get("CONVEYOR_DIFF_SEEDS", "30"))))


SEEDS = _seeds()
VERBOSE = os.environ.get("CONVEYOR_DIFF_VERBOSE", "") not in ("", "0")


def late_limit(tick_seconds: float) -> float:
    """How late a call may finish: queue timeouts end a quarter tick from any call."""
    return max(0.25 * tick_seconds - MARGIN, 0.0)


# -- one play: a script on one backend ------------------------------------------------------


@dataclass
class Play:
    """One script played on one backend: what each call returned and how late it finished."""

    backend: str
    url: str
    queue: str
    script: Script
    tick_seconds: float
    values: list[str] = field(default_factory=list)
    late: list[float] = field(default_factory=list)
    final: dict[str, str] = field(default_factory=dict)
    final_late: float = 0.0
    error: str | None = None

    def open(self) -> QueueManager:
        lease = self.script.lease
        return QueueManager.from_url(
            self.url,
            queue_name=self.queue,
            visibility_timeout=NO_EXPIRY_LEASE if lease is None else lease * self.tick_seconds,
            max_deliveries=MAX_DELIVERIES,
        )

    def run(self, manager: QueueManager, start: float) -> None:
        """Make each call at its planned time ``start + tick``; record value and lateness."""
        messages: dict[int, Message | None] = {}
        for op in self.script.ops:
            planned = start + op.tick * self.tick_seconds
            sleep_until(planned)
            self.values.append(self._call(manager, op, messages))
            self.late.append(time.time() - planned)
        planned = start + self.script.end_tick * self.tick_seconds
        sleep_until(planned)
        for task_id in self.script.task_ids():
            self.final[task_id] = _state(manager, task_id)
        self.final_late = time.time() - planned

    def _call(self, manager: QueueManager, op: Op, messages: dict[int, Message | None]) -> str:
        try:
            return self._result(manager, op, messages)
        except Exception as exc:  # a call that raises on one backend only is a divergence
            return f"raised {type(exc).__name__}: {exc}"

    def _result(self, manager: QueueManager, op: Op, messages: dict[int, Message | None]) -> str:
        def secs(ticks: float | None) -> float | None:
            return None if ticks is None else ticks * self.tick_seconds

        if op.kind == "push":
            return str(
                manager.push(
                    op.task,
                    {"step": op.step},
                    op.priority,
                    delay=secs(op.delay),
                    queue_timeout=secs(op.queue_timeout),
                    max_retries=op.max_retries,
                )
            )
        if op.kind == "reserve":
            message = messages[op.step] = manager.reserve(timeout=0)
            return "None" if message is None else f"{message.task_id}#{message.attempts}"
        if op.kind in MESSAGE_OPS:
            assert op.ref is not None
            held = messages.get(op.ref)
            if held is None:
                return "no message"
            if op.kind == "ack":
                return str(manager.ack(held))
            if op.kind == "nack":
                return str(manager.nack(held, delay=secs(op.delay) or 0))
            if op.kind == "handback":
                return str(manager.nack(held, count_attempt=False))
            if op.kind == "fail":
                return str(manager.fail(held))
            return str(manager.extend(held, secs(op.seconds)))
        assert op.task is not None
        if op.kind == "cancel":
            return str(manager.cancel(op.task))
        if op.kind == "retry":
            return str(manager.retry(op.task))
        if op.kind == "fail_id":
            return str(manager.fail(op.task))
        if op.kind == "inspect":
            return _state(manager, op.task)
        raise AssertionError(f"unknown operation {op.kind!r}")

    def cleanup(self, manager: QueueManager | None) -> None:
        """Leave the shared servers clean: clear the queue, then drop what clear() leaves."""
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.clear()
            with contextlib.suppress(Exception):
                manager.close()
        if self.backend == "redis" or self.url.endswith(f"task_store={REDIS_URL}"):
            _delete_redis_keys(REDIS_URL, self.queue)
        if self.backend == "rabbitmq":
            delete_rabbitmq_queues(self.queue)


def _state(manager: QueueManager, task_id: str) -> str:
    record = manager.get_task(task_id)
    if record is None:
        return "None"
    return f"({record.status.value}, {record.attempts}, {record.dead_reason})"


def _url(backend: str, directory: Path, queue: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{directory}/{queue}.db"
    if backend == "redis":
        return REDIS_URL
    if backend == "postgres":
        return POSTGRES_URLS[0]
    play_dir = directory / queue
    play_dir.mkdir()
    return rabbitmq_url(play_dir)


# -- playing many at once ------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One seed compared on one pair: SQLite and ``other``."""

    other: str
    seed: int

    def script(self) -> Script:
        return generate(self.seed, lease_expiry=self.other != "rabbitmq")


def play_all(jobs: Sequence[Job], tick_seconds: float, directory: Path) -> dict[Job, list[Play]]:
    """Play every job's script on its two backends, all at once; each job at its own phase.

    Every thread opens its manager first; a barrier then fixes the common start, so a slow
    connect never makes a call late. Phases spread the jobs' calls over the tick.
    """
    plays: dict[Job, list[Play]] = {}
    for job in jobs:
        script = job.script()
        plays[job] = []
        for backend in (REFERENCE, job.other):
            queue = f"diff-{job.seed}-{backend}-{uuid.uuid4().hex[:8]}"
            url = _url(backend, directory, queue)
            plays[job].append(Play(backend, url, queue, script, tick_seconds))
    threads: list[threading.Thread] = []
    starts: list[float] = []
    barrier = threading.Barrier(
        sum(len(pair) for pair in plays.values()),
        action=lambda: starts.append(time.time() + 0.5),
        timeout=120,
    )
    for index, pair in enumerate(plays.values()):
        phase = tick_seconds * index / len(plays)
        for play in pair:
            thread = threading.Thread(
                target=_play_thread, args=(play, barrier, starts, phase), daemon=True
            )
            thread.start()
            threads.append(thread)
    for thread in threads:
        thread.join()
    return plays


def _play_thread(play: Play, barrier: threading.Barrier, starts: list[float], phase: float) -> None:
    manager: QueueManager | None = None
    try:
        try:
            manager = play.open()
        finally:
            barrier.wait()  # even if open failed: the others must not wait for it
        if manager is not None:
            play.run(manager, starts[0] + phase)
    except BaseException:
        play.error = traceback.format_exc(limit=4)
        barrier.abort()
    finally:
        play.cleanup(manager)


# -- comparing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """The first place two plays of one script disagree."""

    step: int  # len(ops): the final get_task comparison
    text: str
    too_late: float | None  # the latest lateness up to there, if above the limit


def first_divergence(job: Job, reference: Play, other: Play) -> Divergence | None:
    script, tick = reference.script, reference.tick_seconds
    ops = script.ops
    header = (
        f"seed {job.seed}, script {script.label} (tick {tick:g}s, visibility_timeout "
        f"{f'{NO_EXPIRY_LEASE:g}s' if script.lease is None else f'{script.lease * tick:g}s'}): "
        f"{reference.backend} and {other.backend} disagree"
    )
    tick_env = "" if tick == 1.0 else f"CONVEYOR_DIFF_TICK={tick:g} "
    rerun = (
        f"reproduce: CONVEYOR_DIFF_SEED={job.seed} {tick_env}pytest tests/test_differential.py "
        f"-k {job.other}  (CONVEYOR_DIFF_VERBOSE=1 and -s print both plays)"
    )
    if reference.error or other.error:
        errors = "\n".join(
            f"{play.backend} raised:\n{play.error}" for play in (reference, other) if play.error
        )
        return Divergence(0, f"{header}: a play did not finish\n{errors}\n{rerun}", None)
    for step, op in enumerate(ops):
        mine, theirs = reference.values[step], other.values[step]
        if mine != theirs:
            names = {op.task} | {value.split("#")[0] for value in (mine, theirs)}
            text = (
                f"{header} at step {step} (tick {op.tick}, t={op.tick * tick:g}s): "
                f"{op.describe(tick)}\n"
                f"  {reference.backend:>8}: {mine}\n  {other.backend:>8}: {theirs}\n"
                f"{_context(reference, step, names)}\n{rerun}"
            )
            return Divergence(step, text, _too_late(reference, other, step))
    for task_id in script.task_ids():
        mine, theirs = reference.final[task_id], other.final[task_id]
        if mine != theirs:
            text = (
                f"{header} on the final get_task({task_id!r}) -> (status, attempts, "
                f"dead_reason) at t={script.end_tick * tick:g}s:\n"
                f"  {reference.backend:>8}: {mine}\n  {other.backend:>8}: {theirs}\n"
                f"{_context(reference, len(ops), {task_id})}\n{rerun}"
            )
            return Divergence(len(ops), text, _too_late(reference, other, len(ops)))
    return None


def _too_late(reference: Play, other: Play, step: int) -> float | None:
    """The worst lateness of any call up to ``step`` (both plays), if above the limit."""
    worst = max(
        [*reference.late[: step + 1], *other.late[: step + 1]]
        + ([reference.final_late, other.final_late] if step >= len(reference.late) else [])
    )
    return worst if worst > late_limit(reference.tick_seconds) else None


def _context(play: Play, step: int, names: set[str | None]) -> str:
    """The earlier calls that touched the tasks involved, and the last few calls."""
    ops, tick = play.script.ops, play.tick_seconds
    returned = {op.step: play.values[op.step].split("#")[0] for op in ops[:step]}

    def involved(op: Op) -> bool:
        task = returned.get(op.ref) if op.ref is not None else op.task
        return task in names or (op.kind == "reserve" and returned[op.step] in names)

    shown = [op for op in ops[:step] if involved(op) or op.step >= step - 5]
    lines = [
        f"    step {op.step:>2} t={op.tick * tick:>5g}s  {op.describe(tick)} -> "
        f"{play.values[op.step]}"
        for op in shown[-25:]
    ]
    return f"  earlier calls (values as {play.backend} returned them):\n" + "\n".join(lines)


def dump(job: Job, plays: Sequence[Play]) -> str:
    """Both plays side by side, for CONVEYOR_DIFF_VERBOSE."""
    script, tick = plays[0].script, plays[0].tick_seconds
    lines = [f"== seed {job.seed}, {REFERENCE} vs {job.other}, script {script.label}"]
    for op in script.ops:
        values = " | ".join(f"{play.values[op.step]:<22}" for play in plays)
        lines.append(f"{op.step:>3} t={op.tick * tick:>5g}s {values} {op.describe(tick)}")
    for task_id in script.task_ids():
        lines.append(f"final {task_id}: " + " | ".join(play.final[task_id] for play in plays))
    return "\n".join(lines)


# -- pytest ---------------------------------------------------------------------------------


def _reachable(others: set[str]) -> set[str]:
    """The backends among ``others`` whose server answers (the tests skip or fail the rest)."""
    found = set()
    for other in others:
        try:
            _REQUIRE[other]()
        except (pytest.skip.Exception, pytest.fail.Exception):
            continue
        found.add(other)
    return found


class Results:
    """Plays every selected job at once on first use, so the file takes one script's time."""

    def __init__(self, jobs: list[Job], directory: Path) -> None:
        self._pending, self._directory = jobs, directory
        self._found: dict[Job, str | None] = {}

    def get(self, job: Job) -> str | None:
        if job not in self._found:
            up = _reachable({each.other for each in self._pending})
            batch = [each for each in self._pending if each.other in up]
            self._settle(batch if job in batch else [job])
        return self._found[job]

    def _settle(self, jobs: list[Job]) -> None:
        todo, notes = jobs, {job: "" for job in jobs}
        for scale in (1.0, *RETRY_SCALES):
            tick = TICK_SECONDS * scale
            played = play_all(todo, tick, self._directory)
            again: list[Job] = []
            for job, (reference, other) in played.items():
                if VERBOSE:
                    print(dump(job, (reference, other)))
                found = first_divergence(job, reference, other)
                if found is not None and found.too_late is not None and scale != RETRY_SCALES[-1]:
                    notes[job] += (
                        f"(a call ran {found.too_late:.2f}s late at tick {tick:g}s, over the "
                        f"{late_limit(tick):.2f}s a decision may move: played again with "
                        "longer ticks)\n"
                    )
                    again.append(job)
                    continue
                if found is not None and found.too_late is not None:
                    notes[job] += (
                        f"(even at tick {tick:g}s a call ran {found.too_late:.2f}s late: this "
                        "machine is too loaded to judge this seed)\n"
                    )
                self._found[job] = None if found is None else notes[job] + found.text
            if not again:
                break
            todo = again
        self._pending = [job for job in self._pending if job not in self._found]


def _selected_jobs(items: Sequence[pytest.Item]) -> list[Job]:
    jobs = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        module = getattr(item, "module", None)
        if module is not None and module.__name__ == __name__ and callspec is not None:
            jobs.append(Job(callspec.params["other"], callspec.params["seed"]))
    return jobs


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Results:
    jobs = _selected_jobs(request.session.items)
    if any(job.other == "postgres" for job in jobs) and not POSTGRES_URLS:
        POSTGRES_URLS.append(str(request.getfixturevalue("postgres_url")))
    return Results(_selected_jobs(request.session.items), tmp_path_factory.mktemp("differential"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS, ids=lambda seed: f"seed{seed:02d}")
@pytest.mark.parametrize("other", backend_params("redis", "rabbitmq", "postgres"))
def test_sqlite_and_the_other_backend_agree_on_a_random_script(
    other: str, seed: int, results: Results
) -> None:
    _REQUIRE[other]()
    divergence = results.get(Job(other, seed))
    if divergence is not None:
        pytest.fail(divergence, pytrace=False)


def test_the_scripts_exercise_every_operation() -> None:
    """The generator's mix: a change that stops it producing an operation fails here."""
    scripts = [
        generate(seed, lease_expiry=expiry) for seed in range(30) for expiry in (True, False)
    ]
    kinds = {op.kind for script in scripts for op in script.ops}
    assert kinds >= {"push", "reserve", "ack", "nack", "handback", "fail", "extend", "cancel",
                     "retry", "fail_id", "inspect"}  # fmt: skip
    ops = [op for script in scripts for op in script.ops]
    assert any(op.kind == "nack" and op.delay == 0 for op in ops)
    assert any(op.kind == "nack" and op.delay for op in ops)
    assert any(op.kind == "push" and op.delay for op in ops)
    assert any(op.kind == "push" and op.queue_timeout for op in ops)
    assert any(op.kind == "push" and op.max_retries is not None for op in ops)
    assert generate(3, lease_expiry=True) == generate(3, lease_expiry=True)


def test_every_deadline_in_a_script_falls_between_ticks() -> None:
    """The timeline rule the timing margin rests on (see ``differential_script``)."""
    for seed in range(30):
        for expiry in (True, False):
            script = generate(seed, lease_expiry=expiry)
            for op in script.ops:
                for ticks in (op.delay, op.seconds, script.lease):
                    assert ticks is None or ticks == 0 or ticks % 1 == 0.5, op
                if op.queue_timeout is not None:
                    assert op.queue_timeout % 1 == 0.25, op
            dues: dict[float, int] = {}
            for op in script.ops:
                if op.kind in ("push", "nack") and op.delay:
                    owner = dues.setdefault(op.tick + op.delay, op.tick)
                    assert owner == op.tick, f"seed {seed}: two ticks schedule {op.tick + op.delay}"
