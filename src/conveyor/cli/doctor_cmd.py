"""``conveyor doctor``: print each finding with its fix; exit 1 when something is wrong."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..doctor import DEFAULT_MARGIN, DoctorOptions, Finding, run_checks
from ..urls import mask_url
from .common import out, print_json, settings_from

_DEFAULT_SUPERVISOR = Path("supervisor/conveyor-worker.conf")
_DEFAULT_COMPOSE = Path("docker-compose.yml")
_LABELS = {
    "ok": "ok",
    "problem": "PROBLEM",
    "warning": "WARNING",
    "unchecked": "unchecked",
    "skipped": "skipped",
}


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "doctor",
        parents=[common],
        help="check a deployment for the mistakes that lose tasks",
        description=(
            "Check that the backend answers, that Redis persists and never evicts, and "
            "that supervisor / docker-compose wait longer than worker.max_shutdown_wait "
            "before they SIGKILL a stopping worker. Prints how to fix each problem. Exit 0: "
            "nothing wrong; 1: a problem was found (an unreachable backend included)."
        ),
    )
    parser.add_argument(
        "--supervisor-conf",
        type=Path,
        metavar="FILE",
        help=f"supervisor program file (default: {_DEFAULT_SUPERVISOR} if present)",
    )
    parser.add_argument(
        "--supervisor-url",
        metavar="URL",
        help="a running supervisord: http://host:9001 or unix:///path/to/supervisor.sock",
    )
    parser.add_argument(
        "--compose",
        type=Path,
        metavar="FILE",
        help=f"docker-compose file (default: {_DEFAULT_COMPOSE} if present)",
    )
    parser.add_argument("--no-files", action="store_true", help="skip the default deployment files")
    parser.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        metavar="SECONDS",
        help=f"required wait beyond max_shutdown_wait (default {DEFAULT_MARGIN:g})",
    )
    parser.add_argument("--json", action="store_true", help="findings as JSON")
    parser.set_defaults(handler=doctor_command)


def doctor_command(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    options = DoctorOptions(
        supervisor_conf=_file(args.supervisor_conf, _DEFAULT_SUPERVISOR, args.no_files),
        supervisor_url=args.supervisor_url,
        compose=_file(args.compose, _DEFAULT_COMPOSE, args.no_files),
        margin=args.margin,
    )
    findings = run_checks(settings, options)
    problems = sum(finding.status == "problem" for finding in findings)
    if args.json:
        print_json({"problems": problems, "findings": [asdict(f) for f in findings]})
        return 1 if problems else 0
    out(f"conveyor doctor: backend {mask_url(settings.backend_url())}")
    out()
    for finding in findings:
        _show(finding)
    out()
    if problems:
        out(f"{problems} problem(s) found: each can lose or kill tasks; fix them and re-run.")
        return 1
    out("no problems found.")
    return 0


def _file(given: Path | None, default: Path, skip_defaults: bool) -> Path | None:
    if given is not None:
        return given
    return default if not skip_defaults and default.is_file() else None


def _show(finding: Finding) -> None:
    label = _LABELS[finding.status]
    out(f"  {label:<10} {finding.check:<18} {finding.message}")
    if finding.fix:
        out(f"  {'':<10} {'':<18} fix: {finding.fix}")
