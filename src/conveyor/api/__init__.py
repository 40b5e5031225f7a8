"""The HTTP API and dashboard (``pip install 'conveyor[api]'``): FastAPI over a QueueManager.

``create_app(settings)`` builds the app; ``conveyor api`` serves it with uvicorn. The API is
a producer and inspector: it pushes, reads, cancels and retries tasks and never runs one.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
