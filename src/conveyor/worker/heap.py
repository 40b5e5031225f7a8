"""Keep the garbage collector off the path of a waiting task.

A worker imports a lot (pydantic models, the backend clients, the CLI) before its first
task: tens of thousands of long-lived objects. Python's full (generation 2) collection
walks all of them, which takes 5-40 ms on a busy host, and it comes round every few
hundred tasks; a task pushed at that moment waits for it. Measured on an idle Redis
worker, these were the worst push-to-start delays, far above the 99th percentile.

``freeze_startup_heap`` collects once and then moves every object alive at start into
the permanent generation (``gc.freeze``), so later collections walk only what the loop
allocated since. Forked children inherit the frozen heap, and the collector no longer
writes to those objects' headers, so fewer shared pages are copied into each child.
Reference cycles created later are still found and freed as before.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what start-up left behind, then freeze the rest out of later collections."""
    gc.collect()
    gc.freeze()


def thaw_heap() -> None:
    """When the worker returns: hand the frozen objects back to the collector, so a
    program that embeds a worker (and goes on after it) frees their cycles as before."""
    gc.unfreeze()
