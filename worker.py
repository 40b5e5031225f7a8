"""``python worker.py``: the worker daemon, configured by config/*.yaml and env.

Equivalent to ``conveyor worker``. It runs until SIGTERM/SIGINT (drains running tasks up to
``worker.max_shutdown_wait``), ``conveyor stop``, or a recycling limit, then exits 0.
"""

from __future__ import annotations

import sys

try:
    from conveyor.errors import ConfigError
    from conveyor.settings import load_settings
    from conveyor.worker.bootstrap import run_worker
except ImportError:
    sys.exit("conveyor is not installed: run `make run` (or `pip install -e .`) first")


def main() -> int:
    """Load settings (CONVEYOR_CONFIG or config/development.yaml) and run the worker."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    return run_worker(settings)


if __name__ == "__main__":
    sys.exit(main())
