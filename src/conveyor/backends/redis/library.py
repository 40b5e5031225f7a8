"""The Lua of ``lua/`` packaged two ways: one function library, and one script per operation.

Each operation's file names its ARGV and has a ``-- @include _lifecycle.lua`` line where
the transitions go. As a library (Redis 7+), the constants and the lifecycle are defined
once at ``FUNCTION LOAD`` and each operation is a registered function whose body first
calls ``start_call`` with its keys and arguments. As scripts (older servers), each is the
constants, the lifecycle, then ``start_call(KEYS, ARGV)`` and the body, as one EVAL.

The library's name carries a digest of its code, so two versions of Conveyor sharing a
server during a rolling upgrade each keep their own functions; a library left by an old
version can be removed with ``FUNCTION DELETE``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from ...lifecycle import lua_header

OPERATIONS = (
    "enqueue", "claim", "settle", "renew", "cancel", "retry", "due", "published", "sweep",
    "purge", "migrate", "preempt", "head", "waiting",
)  # fmt: skip
_INCLUDE = re.compile(r"^-- @include _lifecycle\.lua$", re.MULTILINE)
LIBRARY_PREFIX = "conveyor_"


@dataclass(frozen=True)
class Library:
    """``code`` for FUNCTION LOAD, its function name per operation, and the same
    operations as stand-alone scripts (the fallback)."""

    name: str
    code: str
    functions: dict[str, str]
    scripts: dict[str, str]


def _read(name: str) -> str:
    return (resources.files("conveyor.backends.redis") / "lua" / name).read_text(encoding="utf-8")


def _body(operation: str, start: str) -> str:
    """An operation's file with its include line replaced by ``start``."""
    source = _read(f"{operation}.lua")
    body, found = _INCLUDE.subn(start, source)
    if found != 1:
        raise RuntimeError(f"lua/{operation}.lua must include _lifecycle.lua exactly once")
    return body


@cache
def build_library() -> Library:
    """Static files only: no Lua is ever built from runtime values."""
    prelude = lua_header() + _read("_lifecycle.lua")
    scripts = {
        op: "local KEYS, ARGV = KEYS, ARGV\n" + prelude + _body(op, "start_call(KEYS, ARGV)")
        for op in OPERATIONS
    }
    registrations = "".join(
        f"redis.register_function('@LIBRARY@_{op}', function(keys, argv)\n"
        + _body(op, "start_call(keys, argv)")
        + "\nend)\n"
        for op in OPERATIONS
    )
    text = "local KEYS, ARGV\n" + prelude + registrations
    name = LIBRARY_PREFIX + hashlib.sha1(text.encode()).hexdigest()[:16]
    code = f"#!lua name={name}\n" + text.replace("@LIBRARY@", name)
    return Library(name, code, {op: f"{name}_{op}" for op in OPERATIONS}, scripts)
