"""A follower's position in several queues' logs, as one opaque string (an SSE event id).

JSON of ``{queue: id}`` in URL-safe base64: queue names may hold any printable character,
and an SSE id must be one line.
"""

from __future__ import annotations

import base64
import binascii
import json

from ..errors import ConfigError


def encode_cursor(positions: dict[str, str]) -> str:
    raw = json.dumps(positions, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> dict[str, str]:
    """The positions of a cursor; ConfigError for text that is not one."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(
            f"event id {text[:40]!r} is not a cursor this server handed out; reconnect "
            "without Last-Event-ID to start from now"
        ) from exc
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f"event id {text[:40]!r} is not a cursor this server handed out")
    return value
