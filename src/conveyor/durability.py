"""The ``durability`` option: how many replicas must hold a write before Redis acknowledges it.

``replicas=N`` (``replicas=N,timeout=S``) makes every push and every settle that finishes a
try wait, with Redis ``WAIT``, until N replicas have the write, at most S seconds (default
1). Parsed here, apart from the Redis backend, so the settings can check the text without
loading the Redis driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

#: How long a write waits for its replicas when the option names no timeout.
DEFAULT_TIMEOUT = 1.0
_FORM = "write replicas=N or replicas=N,timeout=SECONDS (e.g. replicas=1,timeout=1)"


@dataclass(frozen=True, slots=True)
class Durability:
    """Wait for ``replicas`` replicas, at most ``timeout`` seconds, after each write."""

    replicas: int
    timeout: float = DEFAULT_TIMEOUT

    @property
    def timeout_ms(self) -> int:
        """WAIT's timeout: at least 1 ms (0 would make WAIT block forever)."""
        return max(1, math.ceil(self.timeout * 1000))

    def __str__(self) -> str:
        return f"replicas={self.replicas},timeout={self.timeout:g}"


def parse_durability(text: str | None) -> Durability | None:
    """``replicas=N[,timeout=S]`` -> Durability; None, ``""`` or ``none`` -> None (no wait).

    ``replicas=0`` is accepted and means no wait, so a setting can switch it off.
    """
    if text is None or text.strip().lower() in ("", "none"):
        return None
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("replicas", "timeout") or key in fields:
            raise ConfigError(f"durability: cannot read {text!r}; {_FORM}")
        fields[key] = value.strip()
    if "replicas" not in fields:
        raise ConfigError(f"durability: {text!r} names no replicas; {_FORM}")
    try:
        replicas = int(fields["replicas"])
        timeout = float(fields.get("timeout", DEFAULT_TIMEOUT))
    except ValueError:
        raise ConfigError(f"durability: a value in {text!r} is not a number; {_FORM}") from None
    if replicas < 0:
        raise ConfigError(f"durability: replicas must be 0 or more, got {replicas}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ConfigError(f"durability: timeout must be a number of seconds > 0, got {timeout}")
    return Durability(replicas, timeout) if replicas else None
