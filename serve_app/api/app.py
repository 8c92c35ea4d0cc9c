"""The HTTP API (FastAPI) over a `Gateway`; every error leaves as `{"error", "code"}` JSON.

`create_app` builds the app from one router per protocol, all reading bodies through one
`serve_app.api.body.BodyReader` (the `max_body_bytes` limit), and installs the single
error-to-JSON mapping:
    serve_app.api.v2           Open Inference Protocol v2 (/v2/...)
    serve_app.api.management   model management (/v1/replicas, load/unload/pin), when a
                               `ModelManager` is given
    serve_app.api.native       the native API (/v1/models/..., /v1/predict, /v1/stats,
                               /v1/routing, /healthz)
OpenAPI docs are served at /docs.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import __version__
from serve_app.api.auth import Authorizer, TenantAccounting
from serve_app.api.body import BodyReader, describe_validation
from serve_app.api.management import ManagementGuard, management_router
from serve_app.api.native import (
    ARM_HEADER,
    CACHE_HEADER,
    MODEL_ID_HEADER,
    REQUEST_ID_HEADER,
    VERSION_HEADER,
    native_router,
)
from serve_app.api.v2 import v2_router
from serve_app.config import ManagementConfig
from serve_app.errors import BadRequest, FleetError, error_response
from serve_app.gateway.gateway import Gateway
from serve_app.management.manager import ModelManager

# NOTE: the native headers are re-exported here, where callers found them before the
# routes moved to serve_app.api.native.
__all__ = [
    "ARM_HEADER",
    "CACHE_HEADER",
    "MODEL_ID_HEADER",
    "REQUEST_ID_HEADER",
    "VERSION_HEADER",
    "create_app",
]


def create_app(
    gateway: Gateway,
    max_body_bytes: int,
    stats_window_s: float = 300.0,
    manager: ModelManager | None = None,
    management: ManagementConfig | None = None,
    auth: Authorizer | None = None,
) -> FastAPI:
    """Build the FastAPI app for `gateway`, with the single error mapping installed.

    Management routes exist when a `manager` is given (and `management` does not turn
    them off); the V2 routes always do. With tenants in `auth`, inference routes need a
    key (see serve_app.api.auth) and every such request is accounted per tenant.
    """
    auth = auth or Authorizer(None)
    app = FastAPI(
        title="fleetserve",
        version=__version__,
        description="Thousands of models from S3 behind one Ray Serve endpoint.",
    )
    body = BodyReader(max_body_bytes)
    guard = ManagementGuard(management or ManagementConfig(), available=manager is not None)
    # NOTE: order matters: the native router's POST /v1/models/{rest:path} catch-all would
    # shadow the management routes' POST /v1/models/{model_id}/load|unload if it came first.
    app.include_router(v2_router(gateway, body, manager, guard, auth))
    if manager is not None:
        app.include_router(management_router(manager, guard))
    app.include_router(native_router(gateway, body, stats_window_s, manager, guard, auth))
    _install_error_mapping(app)
    if auth.enabled:
        app.add_middleware(TenantAccounting, authorizer=auth)
    return app


def _install_error_mapping(app: FastAPI) -> None:
    """Route every exception, FastAPI's and Starlette's own included, to `_error_json`."""
    for exc_class in (Exception, FleetError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_class, _error_json)


async def _error_json(request: Request, exc: Exception) -> JSONResponse:
    """The one place an exception becomes a `{"error", "code"}` JSON response.

    Starlette's HTTP errors (unknown route, wrong method) keep their status; FastAPI's
    parameter validation errors are 400 `bad_request`; everything else goes through
    `serve_app.errors.error_response` (typed errors keep their status and code, anything
    else is a 500 without a traceback).
    """
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": str(exc.detail), "code": code}, status_code=exc.status_code)
    if isinstance(exc, RequestValidationError):
        exc = BadRequest(describe_validation(exc.errors()))
    status, body, headers = error_response(exc)
    return JSONResponse(body, status_code=status, headers=headers)
