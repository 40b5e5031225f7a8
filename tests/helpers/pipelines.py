"""Pipelines for ``tests/test_worker.py``, run by real worker processes (``run_worker.py``).

Every step proves what it did through files, never through memory: each run of a step
appends one JSON line to ``<data["dir"]>/<task_id>.<what>`` (so the number of lines is a run
counter, and each line carries the time, the attempt, the child's pid and the worker's pid).
Tests read them back with :func:`runs`.

Steps are module-level functions, as the worker's child processes need them.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from conveyor import Pipeline, StepContext

_POLL = 0.02


# -- side effects --------------------------------------------------------------------------


def append_line(path: str | Path, line: str) -> None:
    """One O_APPEND write per line: lines written by several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def record(ctx: StepContext, what: str, **extra: Any) -> dict[str, Any]:
    """Append one line describing this run of ``what`` to ``<dir>/<task_id>.<what>``."""
    entry = {
        "task": ctx.task_id,
        "what": what,
        "step": ctx.step,
        "attempt": ctx.attempt,
        "pid": os.getpid(),
        "worker_pid": os.getppid(),
        "at": time.time(),
        **extra,
    }
    append_line(Path(ctx.data["dir"]) / f"{ctx.task_id}.{what}", json.dumps(entry))
    return entry


def runs(directory: str | Path, task_id: str, what: str) -> list[dict[str, Any]]:
    """Every recorded run of ``what`` for ``task_id`` (empty when it never happened)."""
    path = Path(directory) / f"{task_id}.{what}"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _per_attempt(value: Any, attempt: int) -> float:
    """``seconds`` may be one number or a list indexed by attempt (the last one repeats)."""
    if isinstance(value, list):
        return float(value[min(attempt, len(value)) - 1])
    return float(value)


def _wait(
    ctx: StepContext, seconds: float, until: Path | None = None, *, stop_on_shutdown: bool = False
) -> str:
    """Sleep up to ``seconds`` (or until ``until`` exists, or the task is canceled).

    Records ``shutdown_seen`` the first time the worker's shutdown flag is visible, so a
    test knows the worker took a signal in without reading its logs.
    """
    deadline = time.monotonic() + seconds
    seen_shutdown = False
    while True:
        if ctx.shutting_down and not seen_shutdown:
            seen_shutdown = True
            record(ctx, "shutdown_seen")
        if seen_shutdown and stop_on_shutdown:
            return "shutdown"
        if ctx.cancelled:
            record(ctx, "cancel_seen")
            return "canceled"
        if until is not None and until.exists():
            return "go"
        if time.monotonic() >= deadline:
            return "slept"
        time.sleep(_POLL)


# -- sleepy: one step that takes a while ------------------------------------------------------

sleepy = Pipeline("sleepy")


@sleepy.step
def nap(ctx: StepContext) -> dict[str, Any]:
    """Sleep ``data["seconds"]`` (per attempt when a list); record start and end."""
    start = record(ctx, "start")
    _wait(ctx, _per_attempt(ctx.data.get("seconds", 0), ctx.attempt))
    end = record(ctx, "end")
    return {"pid": start["pid"], "started": start["at"], "ended": end["at"]}


# -- flaky: three steps, the middle one fails on its first attempts ---------------------------

flaky = Pipeline("flaky")


@flaky.step
def prepare(ctx: StepContext) -> dict[str, Any]:
    entry = record(ctx, "prepare")
    return {"prepared_on_attempt": ctx.attempt, "at": entry["at"]}


@flaky.step
def wobble(ctx: StepContext) -> dict[str, Any]:
    """Raise while ``attempt <= data["fail_times"]``; record what the earlier step left."""
    record(ctx, "wobble", saw=ctx.results.get("prepare"))
    if ctx.attempt <= int(ctx.data["fail_times"]):
        raise ConnectionError(f"wobble: flaky dependency down on attempt {ctx.attempt}")
    return {"wobbled_on_attempt": ctx.attempt}


@flaky.step
def finish(ctx: StepContext) -> dict[str, Any]:
    record(ctx, "finish")
    return {"finished_on_attempt": ctx.attempt, "steps_seen": sorted(ctx.results)}


# -- doomed: a step that always raises --------------------------------------------------------

doomed = Pipeline("doomed")


def explode_always(attempt: int) -> None:
    raise RuntimeError(f"kaboom on attempt {attempt}")


@doomed.step
def always_fails(ctx: StepContext) -> None:
    record(ctx, "always_fails")
    explode_always(ctx.attempt)


# -- misbehave: a step with a 1 s hard limit that hangs, exits or segfaults -------------------

misbehave = Pipeline("misbehave")


@misbehave.step(timeout=1)
def misbehaving(ctx: StepContext) -> dict[str, Any]:
    """``data["mode"]``: ok | slow | hang (sleep past the limit) | exit (os._exit(3)) | segv.

    ``exit_late`` closes every inherited descriptor (its pipe to the worker among them),
    then exits with 3 half a second later: the worker sees the pipe close before it can
    reap the process, every time.
    """
    entry = record(ctx, "start")
    mode = ctx.data["mode"]
    if mode == "hang":
        time.sleep(30)
    elif mode == "slow":  # inside the limit, by data["seconds"]
        time.sleep(float(ctx.data["seconds"]))
    elif mode == "exit":
        os._exit(3)
    elif mode == "segv":
        ctypes.string_at(0)
    elif mode == "exit_late":
        os.closerange(3, 65536)
        time.sleep(0.5)
        os._exit(3)
    return {"pid": entry["pid"], "worker_pid": entry["worker_pid"]}


# -- gate: step one waits for a "go" file (or a cancel); step two must not run after one ------

gate = Pipeline("gate")


@gate.step
def wait_for_go(ctx: StepContext) -> str:
    record(ctx, "gate_open")
    return _wait(ctx, 60, until=Path(ctx.data["dir"]) / f"{ctx.task_id}.go")


@gate.step
def after_gate(ctx: StepContext) -> str:
    record(ctx, "after_gate")
    return "passed"


# -- cooperative: a step that stops early by raising, as the README's example does ---------

cooperative = Pipeline("cooperative")


@cooperative.step
def stop_early(ctx: StepContext) -> str:
    """Wait up to 60 s; raise as soon as the task is canceled or the worker shuts down."""
    record(ctx, "start")
    why = _wait(ctx, 60, stop_on_shutdown=True)
    if why != "slept":
        record(ctx, "stopped_early", why=why)
        raise RuntimeError("stopping early")
    return why


# -- ordered: appends "task_id priority" to one shared file, in the order tasks start --------

ordered = Pipeline("ordered")


@ordered.step
def note_order(ctx: StepContext) -> None:
    append_line(Path(ctx.data["dir"]) / "order.log", f"{ctx.task_id} {ctx.data['priority']}")


# -- validated: data must fit a pydantic schema -----------------------------------------------


class CountData(BaseModel):
    dir: str
    count: int


validated = Pipeline("validated", schema=CountData)


@validated.step
def count_up(ctx: StepContext) -> int:
    record(ctx, "count_up")
    return int(ctx.data["count"]) + 1


# -- quick: the single pipeline `python worker.py` loads from its config ----------------------

quick = Pipeline("quick")


@quick.step
def note(ctx: StepContext) -> dict[str, Any]:
    entry = record(ctx, "note")
    return {"worker_pid": entry["worker_pid"]}


# -- hostile: steps that return or raise what the queue cannot store --------------------------

hostile = Pipeline("hostile", max_retries=1, retry_backoff=0)


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@hostile.step
def first(ctx: StepContext) -> Any:
    """``data["mode"]``: deep | huge | loud | unprintable | bulky | ok."""
    record(ctx, "first")
    mode = ctx.data["mode"]
    if mode == "deep":
        return _nested(300)
    if mode == "huge":
        return "x" * (2 * 1024 * 1024)  # over the default max_payload_bytes (1 MiB)
    if mode == "loud":
        ctx.progress(0.5, "\x1b[2J" + "n" * 100_000)
        time.sleep(0.3)  # the progress report reaches the worker before the failure
        raise RuntimeError("e" * 1_000_000)
    if mode == "unprintable":
        raise UnprintableError()
    if mode == "bulky":
        return "b" * (600 * 1024)
    return "fine"


@hostile.step
def second(ctx: StepContext) -> Any:
    record(ctx, "second")
    return "c" * (600 * 1024) if ctx.data["mode"] == "bulky" else "fine"


@hostile.step
def third(ctx: StepContext) -> Any:
    record(ctx, "third")
    return {"done": ctx.data["mode"]}


# -- poller: a step that reads its cancel flag in a tight loop until its hard limit kills it --

poller = Pipeline("poller")


@poller.step(timeout=0.3)
def poll_cancel(ctx: StepContext) -> None:
    while not ctx.cancelled:
        pass
