"""The app factory: routes, auth, error handlers and the dashboard, wired to one backend.

Security: with ``api.token`` set (``CONVEYOR_API_TOKEN``) every endpoint but ``/health``
requires ``Authorization: Bearer <token>``, compared in constant time; the dashboard's
static files carry no data and stay open so the page can ask for the token. Without a
token ``conveyor api`` binds 127.0.0.1 (see ``serve.py``) and ``guards.BrowserGuard``
checks ``Host`` and ``Origin`` so web pages cannot use the open API. Bodies are limited as
they stream in, before auth and parsing (``guards.BodyLimit``). Errors are JSON
``{"detail": ...}`` and never carry a traceback: the last-resort handler logs it and
answers a generic 500.
"""

from __future__ import annotations

import copy
import hmac
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response, params
from fastapi.exceptions import RequestValidationError
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
from .guards import SECURITY_HEADERS, BodyLimit, BrowserGuard
from .live import live_router
from .metrics import metrics_registry
from .paths import EncodedSlashes
from .registry import QueueRegistry
from .routes import router
from .schemas import ErrorOut, Health

#: Request bodies above this many bytes get a 413 as soon as that many have arrived; JSON
#: escaping can make a payload several times its stored size, hence the margin.
_BODY_MARGIN = 4
#: Methods a 405's Allow header may list.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
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
    # Not "no-referrer": under it the Fetch standard has a browser send "Origin: null" with
    # the page's own POST and DELETE, which an API without a token refuses (guards.py).
    "Referrer-Policy": "same-origin",
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
    app.include_router(live_router, dependencies=protected)
    _add_system_routes(app, registry, protected)
    _add_dashboard(app)
    _add_error_handlers(app)
    # The last added runs first: the browser checks, then the body limit, then the app.
    app.add_middleware(EncodedSlashes)
    app.add_middleware(BodyLimit, limit=settings.queue.max_payload_bytes * _BODY_MARGIN + 65536)
    app.add_middleware(
        BrowserGuard,
        open_access=settings.api.token is None,
        allowed_hosts=settings.api.allowed_hosts,
        bind_host=settings.api.host,
    )
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
        "/api/v1/health",
        response_model=Health,
        responses={503: {"model": Health, "description": "the backend does not answer"}},
        tags=["monitoring"],
        operation_id="health",
    )
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
        return JSONResponse(_with_settings(app.openapi(), registry.settings))


def _with_settings(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The schema with this server's own limits where they are settings (the priority's
    maximum is ``queue.max_priority``), so a client knows exactly what is accepted."""
    schema = copy.deepcopy(schema)
    task_in = schema.get("components", {}).get("schemas", {}).get("TaskIn", {})
    priority = task_in.get("properties", {}).get("priority")
    if isinstance(priority, dict):
        priority["maximum"] = settings.queue.max_priority
    return schema


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

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes each bad input back, and an input of NaN or of
        # invalid Unicode cannot be written as JSON: that turned a 422 into a 500.
        errors = [_plain_error(error) for error in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

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
    """Every method some route serves for this path, found by asking the router itself
    (included routers hide their routes' methods), so Allow is right however they nest."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def _plain_error(error: dict[str, object]) -> dict[str, object]:
    """A validation error as ``{"loc", "msg", "type"}``: the bad input is not echoed (it may
    be huge, NaN or not valid Unicode); ``loc`` parts are made plain text or numbers."""
    loc = error.get("loc", ())
    parts = loc if isinstance(loc, list | tuple) else (loc,)
    return {
        "loc": [part if isinstance(part, int) else _plain_text(part) for part in parts],
        "msg": _plain_text(error.get("msg", "")),
        "type": _plain_text(error.get("type", "value_error")),
    }


def _plain_text(value: object) -> str:
    return str(value).encode("utf-8", "backslashreplace").decode()


def _internal_error(request: Request, exc: BaseException) -> JSONResponse:
    """Log the traceback under an id; tell the client the id, never the traceback."""
    incident = uuid.uuid4().hex[:12]
    logger.opt(exception=exc).error(
        "{} {}: unexpected error (incident {})", request.method, request.url.path, incident
    )
    return JSONResponse(
        {"detail": f"internal error (incident {incident}); the server log has the details"},
        status_code=500,
        headers={key.decode(): value.decode() for key, value in SECURITY_HEADERS},
    )
