"""The parser and the one entry point: ``main(argv) -> exit code``, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from loguru import logger

from ..errors import ConveyorError, TaskNotFoundError
from . import api_cmd, doctor_cmd, live_cmd, manage, overview, produce, run, schedules_cmd
from .common import CliError, printable

_EPILOG = (
    "Settings: --config FILE (else $CONVEYOR_CONFIG, else config/development.yaml) under "
    "environment overrides (CONVEYOR_URL, REDIS_URL, CONVEYOR_<SECTION>__<KEY>); --url "
    "beats both. Exit codes: 0 ok, 1 the operation or check failed, 2 usage, configuration "
    "or backend unreachable."
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"conveyor: {printable(message)} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; ``--config`` and ``--url`` work on every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("settings")
    group.add_argument("--config", metavar="FILE", help="settings file (YAML)")
    group.add_argument(
        "--url", metavar="URL", help="backend URL: sqlite:///path.db, redis://host:6379/0, ..."
    )
    parser = _Parser(
        prog="conveyor",
        description="Conveyor: a priority task queue. Run workers, push and inspect tasks.",
        epilog=_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    run.register(sub, common)
    produce.register(sub, common)
    overview.register(sub, common)
    manage.register(sub, common)
    doctor_cmd.register(sub, common)
    api_cmd.register(sub, common)
    schedules_cmd.register(sub, common)
    live_cmd.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return its exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    quiet = args.command not in ("worker", "api", "mqtt")
    if quiet:
        # Library log lines (e.g. Redis persistence warnings) would clutter command output;
        # `conveyor doctor` reports those findings explicitly.
        logger.disable("conveyor")
    try:
        return int(args.handler(args))
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except TaskNotFoundError as exc:
        return _fail(str(exc), 1)
    except (ConveyorError, ValueError, TypeError) as exc:
        return _fail(_one_line(str(exc)), 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:  # `conveyor ... | head`: the reader left; not an error
        _silence_stdout()
        return 0
    except Exception as exc:
        if os.environ.get("CONVEYOR_DEBUG"):
            raise
        message = f"unexpected {type(exc).__name__}: {exc} (CONVEYOR_DEBUG=1 shows the traceback)"
        return _fail(message, 1)
    finally:
        if quiet:
            logger.enable("conveyor")


def _one_line(message: str) -> str:
    """Settings errors list one bad key per line; join them so stderr gets one line."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"conveyor: {printable(message)}\n")
    sys.stderr.flush()
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
