"""ASGI middleware that runs before routing, auth and body parsing: what a request must pass
before the app spends anything on it.

* :class:`BodyLimit` counts body bytes as they arrive, chunked uploads included, and answers
  413 as soon as the limit is passed (at once for a ``Content-Length`` over it), so a large
  body is never held in memory, whoever sends it.
* :class:`BrowserGuard` protects an API without a token from web pages. Any page can make a
  browser send a form post or a ``no-cors`` fetch to ``127.0.0.1``, and a page on a
  rebound DNS name can even read the answers. So, without a token: the ``Host`` header
  must name one of ``api.allowed_hosts`` (DNS rebinding), and a state-changing request
  from a browser must come from this server's own origin, exactly (scheme, host, port:
  another port of 127.0.0.1 is another origin, though "same-site"). Requests without
  ``Origin`` (curl, scripts) are not browsers' cross-origin requests and pass.
* Every answer carries ``nosniff``, no framing, no referrer and a restrictive CSP.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Methods that change nothing: a cross-origin GET cannot do harm (nor read, without CORS).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: A fetch() from the page itself says so; anything else from a browser is another page.
_OWN_FETCH = frozenset({"same-origin", "none"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # not no-referrer: see _PAGE_HEADERS in app.py
    (b"cross-origin-resource-policy", b"same-origin"),
]
#: For answers that set no policy of their own (the API's JSON): nothing may load or frame.
_DEFAULT_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")


async def _answer(send: Send, status: int, detail: str, *, close: bool = False) -> None:
    """A JSON error answer (``{"detail": ...}``) with the security headers."""
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *SECURITY_HEADERS,
        _DEFAULT_CSP,
    ]
    if close:  # the body (if any) is not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, reading no more than that."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        chunked = _header(scope, b"transfer-encoding") is not None
        if length is None and not chunked:
            await self.app(scope, receive, send)  # no body to limit
            return
        if length is not None and length.strip().isdigit() and int(length) > self.limit:
            await _answer(send, 413, self._too_large(f"{int(length)} bytes"), close=True)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _answer(send, 413, self._too_large("larger"), close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _too_large(self, size: str) -> str:
        return (
            f"request body is {size} than the limit of {self.limit} bytes "
            "(4 x queue.max_payload_bytes + 64 KiB); store large inputs elsewhere"
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body read already, then the real events."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BrowserGuard:
    """Host and Origin checks for an API without a token; security headers always."""

    def __init__(
        self, app: ASGIApp, *, open_access: bool, allowed_hosts: Iterable[str], bind_host: str
    ) -> None:
        self.app = app
        self.open_access = open_access
        allowed = {name.lower() for name in allowed_hosts}
        if bind_host.lower() not in _WILDCARDS:
            allowed.add(_bracketed(bind_host.lower()))
        self.allowed = frozenset(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.open_access:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _answer(send, *refusal, close=True)
                return
        await self.app(scope, receive, _with_security_headers(send))

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        host = _header(scope, b"host")
        if host is None or not self._allowed_host(host):
            shown = "no Host header" if host is None else f"Host {host!r}"
            return 400, (
                f"{shown} is not one of api.allowed_hosts ({', '.join(sorted(self.allowed))}); "
                "add the name this server is reached by to api.allowed_hosts "
                "(CONVEYOR_API__ALLOWED_HOSTS), or set an API token"
            )
        if scope["method"] in SAFE_METHODS:
            return None
        origin = _header(scope, b"origin")
        if origin is None:
            site = _header(scope, b"sec-fetch-site")
            if site is None or site.lower() in _OWN_FETCH:
                return None
            return 403, (
                f"refused a {site} browser request: without an API token, only this "
                "server's own pages may change tasks"
            )
        scheme = str(scope.get("scheme", "http"))
        if _origin_of(origin) == _origin(scheme, host):
            return None
        return 403, (
            f"refused a request from origin {origin!r}: without an API token, only pages "
            f"of this server ({scheme}://{host}) may change tasks"
        )

    def _allowed_host(self, host: str) -> bool:
        name, port = _split_host(host.lower())
        if name is None:
            return False
        return name in self.allowed or (port is not None and f"{name}:{port}" in self.allowed)


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            present = {bytes(key).lower() for key, _ in headers}
            headers += [pair for pair in SECURITY_HEADERS if pair[0] not in present]
            if _DEFAULT_CSP[0] not in present:
                headers.append(_DEFAULT_CSP)
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


def _bracketed(name: str) -> str:
    """IPv6 literals are written in brackets in Host headers and in allowed_hosts."""
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def _split_host(host: str) -> tuple[str | None, int | None]:
    """``name[:port]`` of a Host header (``[v6]:port`` too); (None, None) if malformed."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None, None
        name, rest = host[: end + 1], host[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None, None
        return name, int(rest[1:]) if rest else None
    name, colon, port = host.partition(":")
    if colon and not port.isdigit():
        return None, None
    name = name.removesuffix(".")
    if not name or any(ch in name for ch in " /@?#\\"):
        return None, None
    return name, int(port) if colon else None


def _origin(scheme: str, host: str) -> tuple[str, str, int] | None:
    """(scheme, name, port) with the default port filled in."""
    name, port = _split_host(host.lower())
    if name is None:
        return None
    scheme = scheme.lower()
    return scheme, name, port if port is not None else _DEFAULT_PORTS.get(scheme, 0)


def _origin_of(origin: str) -> tuple[str, str, int] | None:
    scheme, sep, rest = origin.partition("://")
    if not sep or "/" in rest:  # "null", or a path where none belongs
        return None
    return _origin(scheme, rest)
