"""The child process that runs pipeline steps, one task at a time.

The worker keeps ``concurrency`` of these alive and talks to each over a pipe with JSON
(no pickle): a step that crashes, leaks or hangs takes down only its child, which the
worker kills and replaces. Leases and heartbeats are the parent's, so they keep flowing
whatever a step does. On Redis a child also settles its own successes and claims its next
task over a connection of its own (``direct``); everything else goes through the parent.

Protocol (one JSON object per message):
  parent -> child  {"op": "run", "task_id", "data", "attempt", "queue", "type", "steps",
                    "limits": {"max_bytes", "max_depth"},     the queue's JSON policy
                    "token", "run"}       the lease's token; the run's number in this slot
                   {"op": "stop"}
                   {"op": "go"} / {"op": "yield"}  after a step of a run with "pause": true
                                   (preemption): go on, or return at once with no reply
  child -> parent  {"op": "progress", "fraction", "message"}
                   {"op": "step", "name", "result"}       an intermediate step finished
                   {"op": "done", "result", "steps"}      the last step finished
                   {"op": "error", "reason", "type", "message", "traceback", "step"}
                   {"op": "settled", "accepted", "run", "next"}  the child acked the task
                                   itself and runs ``next`` (a claimed message, or null)
                                   as run number ``run`` (see ``direct``)

The cancel flag holds the number of the run to cancel (``CANCEL_ANY``: whatever runs), so
a cancel meant for a task the child already settled cannot stop the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from ..errors import TaskTypeError, TaskValidationError
from ..pipeline import Pipeline, PipelineError, PipelineService, Step, StepContext
from ..validation import DEFAULT_JSON_DEPTH, encode_json
from .direct import ChildSettler
from .flags import Flag
from .signals import forget_wakeup_fd

#: Progress is sent at most this often per task, so a chatty step cannot flood the pipe. A
#: task's first report is always sent (the throttle starts afresh with each task), and a
#: report held back by it is sent when its step ends, so the last one is never dropped.
_PROGRESS_INTERVAL = 0.2
_PR_SET_PDEATHSIG = 1
#: The cancel flag's value that stops any run (a thread slot given up on).
CANCEL_ANY = -1


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the worker dies, so no orphan keeps running a step. A worker
    that died between the fork and this call sends nothing: then leave now (an orphan
    would wait for requests forever, on the worker's end of the pipe it inherited)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(0)


def child_main(
    conn: Connection,
    service: PipelineService,
    cancel_flag: Flag,
    shutdown_flag: Flag,
    settler: ChildSettler | None = None,
) -> None:
    """Serve ``run`` requests until ``stop`` or until the parent goes away."""
    # The terminal's Ctrl+C and supervisor's group TERM reach every process in the group:
    # only the worker decides when a running step must end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    forget_wakeup_fd()
    _die_with_parent()
    serve(conn, service, cancel_flag, shutdown_flag, settler)


def serve(
    conn: Connection,
    service: PipelineService,
    cancel_flag: Flag,
    shutdown_flag: Flag,
    settler: ChildSettler | None = None,
) -> None:
    """The request loop itself: in a child process, or in a thread of the worker
    (``worker.pool: thread``), which speaks the same protocol over the same kind of pipe.
    With ``settler``, a successful run may be settled here and followed by the next task
    (see ``direct``)."""
    runner = _Runner(conn, service, cancel_flag, shutdown_flag)
    following: dict[str, Any] | None = None
    while True:
        if following is not None:
            request, following = following, None
        else:
            try:
                request = json.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return
            if request.get("op") == "release":  # see ``Slot.let_go``
                if settler is not None:
                    settler.let_go()
                continue
            if request.get("op") != "run":
                return
            if settler is not None:
                settler.let_go()
        reply = runner.run(request)
        if reply is None:  # the task yielded (preempted); the parent knows
            continue
        if (settler is not None and reply["op"] == "done" and not runner.sent
                and settler.may_settle()):  # fmt: skip
            reply, following = settler.settle(request, reply)
            if following is not None:  # on to the next task: the worker reads this later
                try:
                    settler.tell(reply)
                except OSError:
                    return
                continue
        try:
            conn.send_bytes(json.dumps(reply, default=str).encode())
        except OSError:
            return  # the worker closed its end (it gave up on this run): nothing to tell


class _Runner:
    def __init__(
        self,
        conn: Connection,
        service: PipelineService,
        cancel_flag: Flag,
        shutdown_flag: Flag,
    ) -> None:
        self.conn = conn
        self.service = service
        self.cancel_flag = cancel_flag
        self.shutdown_flag = shutdown_flag
        self._last_progress = float("-inf")
        self._held: dict[str, Any] | None = None  # a throttled report, sent at the step's end
        self.run_id = 0
        self.sent = 0  # messages the current run sent before its reply

    def run(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Run the task's remaining steps; the reply is ``done`` or ``error`` (None: the
        worker told it to yield at a step boundary)."""
        self._last_progress, self._held = float("-inf"), None  # never carried between tasks
        self.run_id, self.sent = int(request.get("run", 0)), 0
        try:
            return self._run(request)
        finally:
            self._flush_progress()

    def _run(self, request: dict[str, Any]) -> dict[str, Any] | None:
        step_name: str | None = None
        step: Step | None = None
        pipeline: Pipeline | None = None
        try:
            pipeline = self.service.resolve(request.get("type"))
            pipeline.validate_data(request["data"])
            results: dict[str, Any] = dict(request.get("steps") or {})
            for step in pipeline.steps:
                if step.name in results:
                    continue  # finished in an earlier attempt: resume after it
                if self._cancelled():
                    return _error("canceled", "TaskCanceled", "canceled before step " + step.name)
                step_name = step.name
                result = step.function(self._context(request, results, step.name))
                if self._cancelled():  # the contract: a canceled step's result is ignored
                    return _error("canceled", "TaskCanceled", "canceled during step " + step.name)
                results[step.name] = _json_safe(result, step.name, request.get("limits") or {})
                self._flush_progress()
                if step is not pipeline.steps[-1]:
                    self._send({"op": "step", "name": step.name, "result": results[step.name]})
                    if request.get("pause") and not self._go_on():
                        return None
            return {"op": "done", "result": results.get(_last(pipeline)), "steps": results}
        except PipelineError as exc:
            return _error(exc.reason, type(exc).__name__, str(exc))
        except ResultError as exc:  # retrying would return the same result again
            reply = _error("invalid_result", "InvalidResult", str(exc))
            reply["step"] = step_name
            return reply
        except Exception as exc:  # a step's failure is data for the retry policy
            permanent = bool(step and pipeline and pipeline.is_permanent(step, exc))
            reason = "permanent" if permanent else "error"
            reply = _error(reason, type(exc).__name__, _text(exc), traceback.format_exc())
            reply["step"] = step_name
            return reply

    def _go_on(self) -> bool:
        """A preemptible run waits at each step boundary for the worker's word."""
        try:
            answer = json.loads(self.conn.recv_bytes())
        except (EOFError, OSError, ValueError):
            raise SystemExit(0) from None  # the worker is gone
        return not (isinstance(answer, dict) and answer.get("op") == "yield")

    def _context(self, request: dict[str, Any], results: dict[str, Any], step: str) -> StepContext:
        return StepContext(
            task_id=request["task_id"],
            data=request["data"],
            results=results,
            attempt=int(request.get("attempt", 1)),
            queue=request.get("queue", ""),
            step=step,
            report_progress=self._progress,
            is_cancelled=self._cancelled,
            is_shutting_down=lambda: bool(self.shutdown_flag.value),
        )

    def _cancelled(self) -> bool:
        flag = self.cancel_flag.value
        return flag != 0 and (flag == CANCEL_ANY or self.run_id in (0, flag))

    def _progress(self, fraction: float, message: str | None) -> None:
        now = time.monotonic()
        note = message if message is None or isinstance(message, str) else _text(message)
        report = {"op": "progress", "fraction": fraction, "message": note}
        if now - self._last_progress < _PROGRESS_INTERVAL and fraction < 1:
            self._held = report
            return
        self._last_progress, self._held = now, None
        self._send(report)

    def _flush_progress(self) -> None:
        """Send the report the throttle held back, if any (before a step's result)."""
        if self._held is not None:
            report, self._held = self._held, None
            self._last_progress = time.monotonic()
            self._send(report)

    def _send(self, message: dict[str, Any]) -> None:
        self.sent += 1
        self.conn.send_bytes(json.dumps(message).encode())


def _last(pipeline: Pipeline) -> str:
    return pipeline.steps[-1].name


class ResultError(Exception):
    """A step returned what the queue cannot store (not JSON, too large, too deep)."""


def _json_safe(result: Any, step: str, limits: dict[str, Any]) -> Any:
    """A step's result is stored as JSON under the queue's policy (the same check the queue
    makes): refuse here, as the step's failure, what would not survive the trip."""
    try:
        encode_json(
            "result", result, limits.get("max_bytes"), limits.get("max_depth", DEFAULT_JSON_DEPTH)
        )
    except TaskTypeError as exc:
        raise ResultError(
            f"step {step!r} returned {type(result).__name__}, which is not JSON-serializable "
            f"({exc.reason}); return dicts, lists, strings and numbers"
        ) from None
    except TaskValidationError as exc:
        raise ResultError(f"step {step!r} returned a result that cannot be stored: {exc}") from None
    return result


def _text(exc: object) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not take the child down
        return f"<unprintable {type(exc).__name__}>"


def _error(reason: str, type_: str, message: str, trace: str | None = None) -> dict[str, Any]:
    return {"op": "error", "reason": reason, "type": type_, "message": message, "traceback": trace}
