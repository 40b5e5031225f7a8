"""Checks of what makes supervisor give up on a worker before it ever runs a task.

* A log directory that does not exist: supervisor opens ``stdout_logfile`` itself before it
  starts the program, and never creates the directory, so every start fails with
  ``directory ... does not exist`` (a fresh checkout without ``logs/``).
* A ``startsecs``/``startretries`` pair that gives up during a broker outage: a start that
  ends within ``startsecs`` counts as failed; after ``startretries`` of them (with a
  backoff of 1, 2, 3... seconds) the process is FATAL and stays down, broker back or not.
  A worker that waits for its broker (``worker.broker_wait``: forever, or at least
  ``startsecs``) outlives ``startsecs`` and is RUNNING, so an outage never counts; a worker
  that gives up sooner is only safe if supervisor keeps trying for a plausible outage.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import Finding

#: The outage a deployment should ride out (a Redis restart, upgrade or failover).
PLAUSIBLE_OUTAGE = 300.0
#: supervisor's own defaults when a program does not set them.
DEFAULT_STARTSECS, DEFAULT_STARTRETRIES = 1.0, 3
_NOT_FILES = ("", "AUTO", "NONE", "syslog")


def give_up_seconds(startsecs: float, startretries: int) -> float:
    """The longest time supervisor keeps restarting a program whose every start fails:
    ``startretries + 1`` starts of up to ``startsecs`` each, and 1 + 2 + ... +
    ``startretries`` seconds of backoff between them."""
    return (startretries + 1) * startsecs + startretries * (startretries + 1) / 2


def restart_finding(
    check: str, where: str, startsecs: float, startretries: int, broker_wait: tuple[Any, str]
) -> Finding:
    """Does this pair leave the workers FATAL during a plausible outage? Said with numbers."""
    wait, origin = broker_wait
    total = give_up_seconds(startsecs, startretries)
    backoff = " + ".join(str(n) for n in range(1, startretries + 1)) or "0"
    pair = (
        f"startsecs={startsecs:g}s, startretries={startretries}: supervisor gives up (FATAL) "
        f"after {startretries + 1} starts that each end within {startsecs:g}s: within "
        f"about {total:.0f}s, its backoff ({backoff} s) included"
    )
    if startsecs <= 0:
        return Finding(check, "ok", f"{where}: startsecs=0: every start counts as started")
    if wait == "forever" or float(wait) >= startsecs:
        shown = "forever" if wait == "forever" else f"{float(wait):g}s"
        return Finding(
            check,
            "ok",
            f"{where}: the worker waits for its broker ({shown}, worker.broker_wait from "
            f"{origin}), so an outage is never a failed start; {pair}, which only a "
            "configuration error (exit 2 at once) does",
        )
    if total >= PLAUSIBLE_OUTAGE:
        return Finding(check, "ok", f"{where}: {pair}: longer than a {PLAUSIBLE_OUTAGE:g}s outage")
    retries = startretries
    while give_up_seconds(startsecs, retries) < PLAUSIBLE_OUTAGE:
        retries += 1
    return Finding(
        check,
        "problem",
        f"{where}: {pair}. The worker stops waiting for its broker after {float(wait):g}s "
        f"(worker.broker_wait from {origin}), so a broker outage longer than about "
        f"{total:.0f}s leaves these workers FATAL, and they stay down after the broker is "
        "back",
        f"let the worker wait for its broker (worker.broker_wait: forever, the default, or "
        f"at least startsecs), or set startretries={retries} so supervisor keeps trying for "
        f"{PLAUSIBLE_OUTAGE:g}s",
    )


def program_numbers(options: Mapping[str, Any]) -> tuple[float, int] | None:
    """``(startsecs, startretries)`` with supervisor's defaults; None if not numbers."""
    try:
        startsecs = float(options.get("startsecs", DEFAULT_STARTSECS))
        startretries = int(options.get("startretries", DEFAULT_STARTRETRIES))
    except (TypeError, ValueError):
        return None
    return startsecs, startretries


def log_dir_findings(
    check: str, where: str, files: Mapping[str, str], note: str = ""
) -> list[Finding]:
    """A problem for each log file (``stdout_logfile`` etc.) whose directory is missing."""
    findings = []
    for key, value in files.items():
        if value in _NOT_FILES or not value.startswith("/"):
            continue
        folder = Path(value).parent
        if not folder.is_dir():
            findings.append(
                Finding(
                    check,
                    "problem",
                    f"{where}: {key}={value}: directory {folder} does not exist{note}; "
                    "supervisor does not create it, so no process of the program can start",
                    f"mkdir -p {folder} (writable by the program's user), or point {key} "
                    "at an existing directory",
                )
            )
    if not findings and files:
        shown = ", ".join(f"{key}={value}" for key, value in files.items())
        findings.append(Finding(check, "ok", f"{where}: log directories exist ({shown}){note}"))
    return findings


def expand_program(
    options: Mapping[str, str], section: str, conf: Path
) -> tuple[dict[str, str], str]:
    """The log file options with supervisor's ``%(...)s`` expressions expanded as for the
    first process, and a note on any value guessed; raises KeyError for an unknown name.

    ``%(ENV_X)s`` comes from this environment; ``CONVEYOR_HOME``, when unset, is taken as
    the checkout holding the file (``<checkout>/supervisor/conveyor-worker.conf``).
    """
    name = section.removeprefix("program:")
    values: dict[str, Any] = {f"ENV_{key}": value for key, value in os.environ.items()}
    note = ""
    checkout = conf.resolve().parent.parent
    if "ENV_CONVEYOR_HOME" not in values and (checkout / "worker.py").is_file():
        values["ENV_CONVEYOR_HOME"] = str(checkout)
        note = f" (CONVEYOR_HOME taken as {checkout}, the checkout holding the file)"
    values.update(
        program_name=name, group_name=name, process_num=0, numprocs=1,
        host_node_name=socket.gethostname(), here=str(conf.resolve().parent),
    )  # fmt: skip
    keys = ("stdout_logfile", "stderr_logfile")
    files = {key: options[key] % values for key in keys if key in options}
    return files, note
