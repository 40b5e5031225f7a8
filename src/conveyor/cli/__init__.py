"""The ``conveyor`` command line: run workers, push and inspect tasks, check a deployment.

``conveyor --help`` lists the subcommands; each has its own ``--help``. Exit codes scripts
can rely on: 0 done; 1 the operation or check failed (task not found, a duplicate push,
``doctor`` found problems); 2 usage, configuration or an unreachable backend.
"""

from __future__ import annotations

from .app import build_parser, main

__all__ = ["build_parser", "main"]
