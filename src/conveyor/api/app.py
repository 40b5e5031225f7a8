"""The app factory: routes, auth, error handlers and the dashboard, wired to one backend.

Security: with ``api.token`` set (``CONVEYOR_API_TOKEN``) every endpoint but ``/health``
requires ``Authorization: Bearer <token>``, compared in constant time; the dashboard's
static files carry no data and stay open so the page can ask for the token. Without a
token ``conveyor api`` binds 127.0.0.1 (see ``serve.py``). Errors are JSON ``{"detail":
...}`` and never carry a traceback: the last-resort handler logs it and answers a generic
500.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Response, params
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..backends import backend_for_url
from ..errors import (
    BrokerUnavailableError,
    ConfigError,
    ConveyorError,
    TaskNotFoundError,
    TaskTypeError,
    TaskValidationError,
)
from ..settings import Settings, load_settings
from .metrics import metrics_registry
from .registry import QueueRegistry
from .routes import router
from .schemas import ErrorOut, Health

#: Request bodies above this many bytes (Content-Length) get a 413 before they are read;
#: JSON escaping can make a payload several times its stored size, hence the margin.
_BODY_MARGIN = 4
_TASKS = "/api/v1/tasks"
_STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: Declares the scheme in the OpenAPI schema; the check itself is in ``_auth_dependency``.
_bearer = HTTPBearer(
    auto_error=False,
    description="the API token (CONVEYOR_API_TOKEN)",
)
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API and dashboard for the backend ``settings`` name (default: ``load_settings()``).

    Queues are opened on first use and closed when the app shuts down; nothing connects
    until the first request, so the app builds even while the backend is down.
    """
    settings = settings if settings is not None else load_settings()
    registry = QueueRegistry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        registry.close()

    app = FastAPI(
        title="Conveyor",
        summary="Push, inspect, cancel and retry tasks of a Conveyor priority queue.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; the schema is served below instead
        redoc_url=None,
        openapi_url=None,
    )
    app.state.registry = registry
    auth = _auth_dependency(settings)
    protected = [Depends(auth)]
    app.include_router(router, dependencies=protected)
    _add_system_routes(app, registry, protected)
    _add_dashboard(app)
    _add_error_handlers(app)
    _add_body_limit(app, settings.queue.max_payload_bytes * _BODY_MARGIN + 65536)
    return app


def _auth_dependency(settings: Settings) -> Callable[..., None]:
    """The check every protected route runs. Without a token it checks nothing and the
    OpenAPI schema declares no security scheme, so the schema says what the server does."""
    if settings.api.token is None:

        def open_access() -> None:
            return None

        return open_access

    token = settings.api.token.get_secret_value().encode()

    def check_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, token):
            raise HTTPException(
                401,
                "missing or wrong token: send 'Authorization: Bearer <token>' with the API "
                "token (CONVEYOR_API_TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check_token


def _add_system_routes(
    app: FastAPI, registry: QueueRegistry, protected: list[params.Depends]
) -> None:
    collectors = metrics_registry(registry)
    kind = backend_for_url(registry.settings.backend_url()).value
    no_token = registry.settings.api.token is None

    @app.get(
        "/health",
        response_model=Health,
        responses={503: {"model": Health, "description": "the backend does not answer"}},
        tags=["monitoring"],
    )
    def health() -> JSONResponse:
        """Pings the backend: 200 when it answers, 503 when not. Never needs the token."""
        try:
            registry.ping()
        except ConveyorError as exc:
            logger.warning("health: the backend does not answer: {}", exc)
            # Without a token everything is open anyway; with one, /health says no more
            # than "down" to callers who have not shown it.
            detail = str(exc) if no_token else f"the {kind} backend does not answer"
            body = Health(status="unavailable", backend=kind, detail=detail)
            return JSONResponse(body.model_dump(), status_code=503)
        return JSONResponse(Health(status="ok", backend=kind).model_dump())

    @app.get(
        "/metrics",
        dependencies=protected,
        tags=["monitoring"],
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
            **({} if no_token else {401: {"model": ErrorOut, "description": "no token"}}),
        },
    )
    def metrics() -> Response:
        """Prometheus text format, read from the backend at scrape time (see ``metrics``)."""
        return Response(generate_latest(collectors), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/openapi.json", dependencies=protected, include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())


def _add_dashboard(app: FastAPI) -> None:
    folder = resources.files("conveyor.api") / "static"
    page = (folder / "index.html").read_bytes()
    assets = {name: ((folder / name).read_bytes(), kind) for name, kind in _STATIC.items()}

    @app.get("/", include_in_schema=False)
    def dashboard() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, f"no static file {name!r}")
        body, kind = assets[name]
        return Response(body, media_type=kind, headers=_PAGE_HEADERS)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ConveyorError)
    async def conveyor_error(request: Request, exc: ConveyorError) -> JSONResponse:
        if isinstance(exc, TaskValidationError | TaskTypeError):
            # The same shape as pydantic's 422s: a push names the body field, other calls
            # only validate the task id in their path.
            pushing = request.method == "POST" and request.url.path.rstrip("/") == _TASKS
            field = exc.field
            loc = ["body", "id" if field == "task_id" else field] if pushing else ["path", field]
            error = {"loc": loc, "msg": exc.reason, "type": "value_error"}
            return JSONResponse({"detail": [error]}, status_code=422)
        if isinstance(exc, TaskNotFoundError):
            return JSONResponse({"detail": str(exc)}, status_code=404)
        if isinstance(exc, BrokerUnavailableError):
            logger.warning("{} {}: backend unavailable: {}", request.method, request.url.path, exc)
            return JSONResponse(
                {"detail": f"the queue backend is unavailable: {exc}; retry later"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        if isinstance(exc, ConfigError | ValueError | TypeError):
            return JSONResponse({"detail": str(exc)}, status_code=422)
        return _internal_error(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route that matched the path;
            # a client (and RFC 9110) wants every method the path allows.
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error(request, exc)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _internal_error(request: Request, exc: BaseException) -> JSONResponse:
    """Log the traceback under an id; tell the client the id, never the traceback."""
    incident = uuid.uuid4().hex[:12]
    logger.opt(exception=exc).error(
        "{} {}: unexpected error (incident {})", request.method, request.url.path, incident
    )
    return JSONResponse(
        {"detail": f"internal error (incident {incident}); the server log has the details"},
        status_code=500,
    )


def _add_body_limit(app: FastAPI, limit: int) -> None:
    @app.middleware("http")
    async def body_limit(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return JSONResponse(
                {"detail": f"request body is {length} bytes; the limit is {limit}"},
                status_code=413,
            )
        return await call_next(request)
