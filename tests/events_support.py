"""Helpers for the live-event tests: the API under uvicorn in a thread, an SSE reader."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import uvicorn

from api_support import free_port
from conftest import wait_until
from conveyor.api import create_app
from conveyor.settings import Settings


def serve_app(settings: Settings) -> tuple[str, Callable[[], None]]:
    """Start the app on a free port; returns its base URL and a stop function."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=15, message="uvicorn to start")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=15)

    return f"http://127.0.0.1:{port}", stop


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Parse an SSE response into {'id', 'event', 'data'} dicts (comments skipped)."""
    current: dict[str, Any] = {}
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data:
                current["data"] = json.loads("\n".join(data))
                yield current
            current, data = {}, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field in ("id", "event"):
                current[field] = value
