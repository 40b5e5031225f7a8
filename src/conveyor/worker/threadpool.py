"""``worker.pool: thread``: run steps in threads of the worker instead of child processes.

For tasks that need no isolation (short, I/O-bound, well-behaved code), like Celery's
``-P threads`` and Dramatiq's worker threads: no child process per slot (less memory,
nothing forked), and the hand-off stays inside one process.

A thread slot speaks the child's protocol (``child.serve``) over the same kind of pipe,
so the worker's loop, its outbox, its leases and its fencing are the very same code in
both modes; only the thing at the other end of the pipe differs. A thread gets a
*sentinel* (the read end of an ``os.pipe`` whose write end closes when the thread ends),
so a thread that dies (``SystemExit`` in a step, say) is seen like a dead child, and its
task is failed as ``crashed`` and retried by policy.

What a thread cannot do: be killed. So the worker refuses, at start, what needs a kill:
a pipeline or step with a hard time limit, and ``memory_mb`` (a thread's memory is the
worker's). A task pushed with its own ``process_timeout`` still gets its deadline: the
task is failed as ``timeout`` and the slot gets a fresh thread, while the abandoned one
finishes its step in the background (its result is dropped; it stops before its next
step, as on cancel). The same happens to a run the worker gives up on at the end of the
shutdown wait.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from multiprocessing.context import BaseContext
from typing import Literal

from ..errors import ConfigError
from ..pipeline import PipelineService
from .child import CANCEL_ANY, serve
from .direct import ChildSettler
from .flags import Flag, shared_flag
from .options import WorkerOptions
from .slots import Slot

Pool = Literal["process", "thread"]
POOLS: tuple[Pool, ...] = ("process", "thread")


def check_thread_pool(options: WorkerOptions, service: PipelineService) -> None:
    """Refuse, before any task is taken, settings that a thread cannot honour."""
    if options.memory_mb is not None:
        raise ConfigError(
            f"worker.memory_mb ({options.memory_mb:g}) needs worker.pool: process: in thread "
            "mode the steps share the worker's memory, so no child can be recycled for "
            "using too much; remove memory_mb (or --memory), or use the process pool"
        )
    for pipeline in service.pipelines.values():
        limit = pipeline.hard_limit()
        if limit is not None:
            raise ConfigError(
                f"pipeline {pipeline.name!r} has a hard time limit ({limit:g}s), which needs "
                "worker.pool: process: a thread cannot be killed when a step runs over; "
                "use the process pool for this pipeline, or drop its timeout"
            )


class _ThreadRun:
    """The thread behind a slot, shaped like the ``Process`` the loop expects of a child:
    ``sentinel`` becomes readable when it ends, ``kill`` gives up on it (a thread cannot be
    stopped from outside: it is told to stop before its next step and left to finish)."""

    def __init__(self, target: threading.Thread, sentinel: int, cancel: Flag):
        self._thread = target
        self.sentinel = sentinel
        self._cancel = cancel
        self.pid: int | None = None  # no process of its own: nothing for the memory limit
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def kill(self) -> None:
        self._cancel.value = CANCEL_ANY

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.exitcode = 0
            with contextlib.suppress(OSError):
                os.close(self.sentinel)
            self.sentinel = -1


class ThreadSlot(Slot):
    """A slot whose steps run in a thread of the worker (``worker.pool: thread``)."""

    def spawn(self) -> None:
        parent_end, child_end = multiprocessing.Pipe(duplex=True)
        # Each thread has its own cancel flag: a thread given up on keeps its raised flag
        # (it stops before its next step), while the fresh one starts with a clear flag.
        self.cancel_flag = shared_flag(self._context)
        readable, writable = os.pipe()
        args = (child_end, self._service, self.cancel_flag, self._shutdown_flag, writable)
        thread = threading.Thread(
            target=_thread_main, args=args, name=f"conveyor-thread-{self.index}", daemon=True
        )
        self.process = _ThreadRun(thread, readable, self.cancel_flag)  # type: ignore[assignment]
        self.conn = parent_end
        thread.start()

    def kill(self) -> None:
        """Give up on the running thread (see the module's doc) and start a fresh one."""
        self.process.kill()
        self.conn.close()  # the old thread's reply, if any, goes nowhere
        self._forget_sentinel()
        self.spawn()

    def stop(self, timeout: float) -> None:
        super().stop(timeout)
        self._forget_sentinel()

    def _forget_sentinel(self) -> None:
        sentinel = getattr(self.process, "sentinel", -1)
        if isinstance(sentinel, int) and sentinel >= 0:
            with contextlib.suppress(OSError):
                os.close(sentinel)
            self.process.sentinel = -1  # type: ignore[misc]


def _thread_main(
    conn: multiprocessing.connection.Connection,
    service: PipelineService,
    cancel_flag: Flag,
    shutdown_flag: Flag,
    sentinel: int,
) -> None:
    try:
        serve(conn, service, cancel_flag, shutdown_flag)
    except SystemExit:
        pass  # a step called sys.exit(): the thread ends, and its run counts as crashed
    finally:
        conn.close()
        os.close(sentinel)  # the loop sees the end of the thread, as it sees a child's exit


def make_slots(
    pool: Pool, count: int, context: BaseContext, service: PipelineService,
    shutdown_flag: Flag, *, settler: ChildSettler | None = None,
) -> list[Slot]:  # fmt: skip
    """``count`` slots of the pool's kind (``settler``: child processes only)."""
    if pool == "thread":
        return [ThreadSlot(index, context, service, shutdown_flag) for index in range(count)]
    return [Slot(index, context, service, shutdown_flag, settler) for index in range(count)]
