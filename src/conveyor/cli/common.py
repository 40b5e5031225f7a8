"""What every subcommand shares: settings from ``--config``/``--url``, opening queues, output.

Output rules: tables are plain aligned text on stdout (numbers right-aligned); progress and
prompts go to stderr, so ``conveyor ... > file`` and ``--json | jq`` stay clean; nothing
printed ever carries a password (URLs are masked); and nothing printed can drive the
terminal: every unprintable character (ESC, other controls, invalid Unicode) in a value
from the store or the user is shown escaped (``\x1b``), see :func:`printable`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from ..manager import QueueManager
from ..settings import Settings, load_settings


class CliError(Exception):
    """A command failed in a way the user should read: one line, and an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def settings_from(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings from ``--config`` (else CONVEYOR_CONFIG / config/development.yaml) and env;
    ``--url`` and ``overrides`` beat both."""
    if getattr(args, "url", None):
        overrides["url"] = args.url
    return load_settings(getattr(args, "config", None), **overrides)


def queue_name(args: argparse.Namespace, settings: Settings) -> str:
    """``--queue`` when given, else ``queue.name`` from the settings."""
    return getattr(args, "queue", None) or settings.queue.name


@contextmanager
def open_queue(
    settings: Settings, name: str | None = None, *, reader: bool = False
) -> Iterator[QueueManager]:
    """A manager on ``name`` (default: the configured queue), closed afterwards; ``reader``
    for commands that only read (they never create a SQLite file)."""
    manager = QueueManager.from_settings(settings, queue_name=name, reader=reader)
    try:
        yield manager
    finally:
        manager.close()


# -- output ---------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` with every unprintable character escaped, line breaks kept.

    ESC, the C1 controls (0x9b is CSI to some terminals), bidi overrides and invalid
    Unicode could rewrite the screen or hide text; escaped, they are visible and inert.
    """
    if text.isascii() and text.isprintable():
        return text
    return "\n".join(
        line if line.isprintable() else "".join(_escape(ch) for ch in line)
        for line in text.split("\n")
    )


def _escape(ch: str) -> str:
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def out(text: str = "") -> None:
    """A line on stdout, escaped (:func:`printable`) and flushed (``--watch`` and pipes see
    it at once)."""
    sys.stdout.write(printable(text) + "\n")
    sys.stdout.flush()


def note(text: str) -> None:
    """A line on stderr: progress and remarks that scripts reading stdout should not see."""
    sys.stderr.write(printable(text) + "\n")
    sys.stderr.flush()


def print_json(value: Any) -> None:
    """``value`` as indented JSON; unprintable characters inside strings are written as
    JSON escapes (``\u001b``), so the output is both valid JSON and inert on a terminal."""
    text = json.dumps(value, indent=2, default=str, ensure_ascii=False)
    out("".join(ch if ch.isprintable() or ch == "\n" else _json_escape(ch) for ch in text))


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a surrogate pair, as JSON writes characters beyond the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Rows as aligned columns; numeric columns (and those in ``right``) are right-aligned.

    ``None`` shows as ``-``; floats with two decimals.
    """
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    numeric = [
        i in right
        or (bool(rows) and all(isinstance(row[i], int | float) or row[i] is None for row in rows))
        for i in range(len(headers))
    ]
    lines = []
    for row in [list(headers), *cells]:
        parts = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return printable(str(value))


def when(moment: datetime | float | None) -> str:
    """A time as ``2026-01-31 14:05:09Z`` (UTC, so hosts in other zones agree)."""
    if moment is None:
        return "-"
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, tz=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ago(epoch: float | None, now: float | None = None) -> str:
    """How long ago, briefly: ``4s ago``, ``12m ago``, ``3h ago``."""
    if epoch is None:
        return "-"
    seconds = max(0.0, (now if now is not None else time.time()) - epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def shorten(text: str, width: int = 60) -> str:
    """One line of at most ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# -- interaction ----------------------------------------------------------------------------


def confirm(question: str, *, yes: bool) -> None:
    """Ask on a terminal unless ``--yes``; refuse (exit 2) when no one can answer."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliError(f"{question} Refusing without --yes: stdin is not a terminal", code=2)
    sys.stderr.write(f"{printable(question)} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise CliError("not confirmed; nothing changed", code=1)


class Progress:
    """``done/total`` on one self-rewriting stderr line, shown only on a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.enabled = sys.stderr.isatty() and total > 0
        self._shown = False

    def update(self, done: int) -> None:
        if self.enabled:
            percent = 100 * done // self.total
            sys.stderr.write(f"\r{self.label} {done}/{self.total} ({percent}%)")
            sys.stderr.flush()
            self._shown = True

    def finish(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
