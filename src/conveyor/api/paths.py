"""Task ids in URL paths: one path segment, whatever the id holds.

An id may contain "/" (``meetings/2024/weekly``), "%", "?", or "/.." (ids are free text).
Clients put it in one path segment by percent-encoding it (``encodeURIComponent``, Python's
``quote(id, safe="")``; the ``Location`` of a push does so), and the server must then not
decode ``%2F`` into a "/" before routing, as ASGI servers do: ``a%2Fretry`` is the task
``a/retry``, not the retry of task ``a``. :class:`EncodedSlashes` routes on the path as
sent with ``%2F`` and ``%25`` kept encoded, and the ``taskid`` convertor decodes them in the
matched id.

For older clients an id with raw slashes still works (``GET /api/v1/tasks/a/b``), except
one whose raw form ends in ``/retry``: that path is the retry action of the id before it.

The ids "." and ".." are refused at push (``check_task_id``): browsers and most HTTP clients
remove such path segments (also written ``%2e``) before sending, so no URL can name them.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from starlette.convertors import Convertor, register_url_convertor
from starlette.types import ASGIApp, Receive, Scope, Send

#: The paths whose ids are routed on the path as sent.
TASKS_PREFIX = "/api/v1/tasks/"
_KEPT = re.compile(r"(%2[fF]|%25)")


class TaskIdConvertor(Convertor[str]):
    """A task id: any text, "/" included, but not ending in "/retry" (the retry action)."""

    regex = r".+?(?<!/retry)"

    def convert(self, value: str) -> str:
        return unquote(value)  # only %2F and %25 are still encoded (see EncodedSlashes)

    def to_string(self, value: str) -> str:
        return value.replace("%", "%25").replace("/", "%2F")


register_url_convertor("taskid", TaskIdConvertor())


def routing_path(raw_path: bytes) -> str:
    """The path to route on: decoded, except ``%2F`` and ``%25``, which stay encoded."""
    parts = _KEPT.split(raw_path.decode("latin-1"))
    return "".join(part.upper() if _KEPT.fullmatch(part) else unquote(part) for part in parts)


class EncodedSlashes:
    """Route ``/api/v1/tasks/...`` on the path as sent, so an encoded "/" stays in its id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        if (
            scope["type"] == "http"
            and isinstance(raw, bytes)
            and str(scope.get("path", "")).startswith(TASKS_PREFIX)
            and not scope.get("root_path")
        ):
            scope = {**scope, "path": routing_path(raw)}
        await self.app(scope, receive, send)
