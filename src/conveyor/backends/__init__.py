"""Storage backends: the seams (``base``) and the table that picks one by URL (``table``)."""

from __future__ import annotations

from .base import (
    Claimed,
    ClaimResult,
    ClaimSpec,
    Enqueued,
    LeaseState,
    NewTask,
    Outcome,
    QueueRecords,
    QueueStore,
    Server,
    ServerRegistry,
    Settled,
    StoreConfig,
    Ticket,
    TicketClaim,
)
from .table import (
    BACKENDS,
    QueueBackend,
    backend_for_url,
    open_server,
    spec_for_kind,
    spec_for_url,
    sqlite_path_from_url,
)

__all__ = [
    "BACKENDS",
    "ClaimResult",
    "ClaimSpec",
    "Claimed",
    "Enqueued",
    "LeaseState",
    "NewTask",
    "Outcome",
    "QueueBackend",
    "QueueRecords",
    "QueueStore",
    "Server",
    "ServerRegistry",
    "Settled",
    "StoreConfig",
    "Ticket",
    "TicketClaim",
    "backend_for_url",
    "open_server",
    "spec_for_kind",
    "spec_for_url",
    "sqlite_path_from_url",
]
