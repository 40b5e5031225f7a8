"""Entry point the seed documents: ``python worker.py``.

The pipeline-running daemon (TaskWorker) is its own issue; until it lands this script
checks the configured backend and reports its queue, so deployments can be wired up now.
"""

from __future__ import annotations

import sys

try:
    from conveyor import ConveyorError, QueueManager
    from conveyor.settings import load_settings
except ImportError:
    sys.exit("conveyor is not installed: run `make run` (or `pip install -e .`) first")


def main() -> int:
    """Open the configured queue and print its state; exit 2 with one line on a bad setup."""
    try:
        settings = load_settings()
        with QueueManager.from_settings(settings) as queue:
            queue.ping()
            stats = queue.stats()
    except ConveyorError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    print(f"queue {stats.queue!r} at {queue.url}: {stats.counts}")
    print("the TaskWorker daemon is not part of this version yet; see README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
