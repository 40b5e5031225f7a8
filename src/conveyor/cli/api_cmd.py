"""``conveyor api``: serve the HTTP API and the dashboard with uvicorn."""

from __future__ import annotations

import argparse
from typing import Any

from ..logs import configure_logging
from .common import CliError, settings_from


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "api",
        parents=[common],
        help="serve the HTTP API and the dashboard (needs the 'api' extra)",
        description=(
            "Serve the HTTP API (/api/v1/...), /health, /metrics and the dashboard at / "
            "until Ctrl+C or SIGTERM. Binds api.host (default 127.0.0.1). With "
            "CONVEYOR_API_TOKEN set, every endpoint but /health requires 'Authorization: "
            "Bearer <token>'; binding another address without a token logs a warning."
        ),
    )
    parser.add_argument("--host", metavar="ADDRESS", help="address to bind (default api.host)")
    parser.add_argument("--port", type=int, metavar="PORT", help="port (default api.port, 8000)")
    parser.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ...")
    parser.add_argument(
        "--log-file", metavar="PATH", help="the API's rotating log file (default api.log_file)"
    )
    parser.set_defaults(handler=api_command)


def api_command(args: argparse.Namespace) -> int:
    """Serve until stopped; 0 after a clean stop, 2 when the extra is not installed."""
    api: dict[str, Any] = {}
    if args.host is not None:
        api["host"] = args.host
    if args.port is not None:
        api["port"] = args.port
    if args.log_file is not None:
        api["log_file"] = args.log_file
    overrides: dict[str, Any] = {"api": api} if api else {}
    if args.log_level:
        overrides["logging"] = {"level": args.log_level}
    settings = settings_from(args, **overrides)
    try:
        from ..api.serve import serve
    except ImportError as exc:  # FastAPI, uvicorn or prometheus-client
        raise CliError(
            f"the HTTP API needs the 'api' extra ({exc.name or exc} is not installed): "
            "pip install 'conveyor[api]'",
            code=2,
        ) from None
    # The API's own file (api.log_file), never the worker's logging.file: two processes
    # rotating one file race each other and interleave two programs' lines.
    configure_logging(settings.logging.model_copy(update={"file": settings.api.log_file}))
    serve(settings, log_level=settings.logging.level)
    return 0
