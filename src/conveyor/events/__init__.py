"""Live task events: follow one or many queues' event logs (``follow``), resumable cursors
(``cursor``). The logs themselves are the backends' (``backends.eventlog``)."""

from ..backends.eventlog import RESET, EventLog, LiveEvent
from .cursor import decode_cursor, encode_cursor
from .follow import Follower

__all__ = ["RESET", "EventLog", "Follower", "LiveEvent", "decode_cursor", "encode_cursor"]
