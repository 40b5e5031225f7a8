"""Serve the API with uvicorn (``conveyor api``), warning when it is exposed without a token."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import threading
from collections.abc import Iterator

import uvicorn
from loguru import logger

from ..settings import Settings
from .app import create_app


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses only this machine reaches."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


def exposure_warning(settings: Settings) -> str | None:
    """The warning to give when the API would be reachable by others without a token."""
    host = settings.api.host
    if settings.api.token is not None or is_loopback(host):
        return None
    return (
        f"serving on {host}:{settings.api.port} without a token: anyone who reaches this "
        "port can push, cancel and retry tasks. Set CONVEYOR_API_TOKEN, or bind 127.0.0.1"
    )


def serve(settings: Settings, *, log_level: str = "info") -> None:
    """Run the API and dashboard until SIGINT/SIGTERM (uvicorn stops gracefully on both,
    finishing requests in flight). Blocks."""
    warning = exposure_warning(settings)
    if warning:
        logger.warning(warning)
    host, port = settings.api.host, settings.api.port
    shown = f"[{host}]" if ":" in host else host
    logger.info("Conveyor API and dashboard on http://{}:{}/ (auth: {})", shown, port,
                "bearer token" if settings.api.token else "none")  # fmt: skip
    with _stop_is_success():
        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            log_level=log_level.lower(),
            proxy_headers=False,
            server_header=False,
            access_log=True,
        )


@contextlib.contextmanager
def _stop_is_success() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
    handler that was there before. A no-op one makes that graceful stop return normally, so
    ``conveyor api`` exits 0 after SIGTERM, as ``conveyor worker`` does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore(signum: int, frame: object) -> None:
    return None
