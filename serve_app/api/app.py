"""The HTTP API (FastAPI) over a `Gateway`; every error leaves as `{"error", "code"}` JSON.

Routes:
    POST /v1/models/{model_id}/predict                  predict with the latest version
    POST /v1/models/{model_id}/versions/{version}/predict
    POST /v1/predict                                     model id in the
                                                         `serve_multiplexed_model_id` header
    GET  /v1/models                                      registry listing
    GET  /v1/models/{model_id}                           manifest (latest or ?version=)
    GET  /v1/stats                                       per-model stats (?window_s=)
    GET  /v1/routing                                     active routing, refusals, per-arm
                                                         counters
A model id may be `id`, `id@version` or an alias; on an alias, the header the routing
config names (default `X-User-Id`) keeps a caller on one arm, and `X-Fleet-Arm` says
which arm served.
    GET  /healthz                                        liveness + registry state
Included routers: Open Inference Protocol v2 (`serve_app.api.v2`, /v2/...) and model
management (`serve_app.api.management`: /v1/replicas, load/unload/pin).
OpenAPI docs are served at /docs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import __version__
from serve_app.api.management import ManagementGuard, management_router
from serve_app.api.v2 import read_limited_body, v2_router
from serve_app.config import ManagementConfig
from serve_app.errors import (
    BadRequest,
    FleetError,
    InvalidModelId,
    MalformedBody,
    error_response,
)
from serve_app.gateway.gateway import Gateway, new_id
from serve_app.management.manager import ModelManager
from serve_app.observability.stats import StatsReport
from serve_app.schemas import (
    ErrorBody,
    ModelDetail,
    ModelList,
    PredictRequest,
    PredictResponse,
)

logger = logging.getLogger(__name__)

# NOTE: the same header Ray Serve's proxy reads for model multiplexing
# (ray.serve._private.constants.SERVE_MULTIPLEXED_MODEL_ID); a test pins the equality.
MODEL_ID_HEADER = "serve_multiplexed_model_id"
CACHE_HEADER = "X-Fleet-Cache"
VERSION_HEADER = "X-Fleet-Model-Version"
REQUEST_ID_HEADER = "X-Request-Id"
ARM_HEADER = "X-Fleet-Arm"

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 404, 413, 422, 500, 502, 503, 507)
}


def create_app(
    gateway: Gateway,
    max_body_bytes: int,
    stats_window_s: float = 300.0,
    manager: ModelManager | None = None,
    management: ManagementConfig | None = None,
) -> FastAPI:
    """Build the FastAPI app for `gateway`, with the single error mapping installed.

    Management routes exist when a `manager` is given (and `management` does not turn
    them off); the V2 routes always do.
    """
    app = FastAPI(
        title="fleetserve",
        version=__version__,
        description="Thousands of models from S3 behind one Ray Serve endpoint.",
    )
    guard = ManagementGuard(management or ManagementConfig(), available=manager is not None)
    # NOTE: before the /v1/models/{rest:path} catch-all below, which would shadow them.
    app.include_router(v2_router(gateway, max_body_bytes, manager, guard))
    if manager is not None:
        app.include_router(management_router(manager, guard))

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> JSONResponse:
        status, body, headers = error_response(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(FleetError)
    async def _fleet_error(request: Request, exc: FleetError) -> JSONResponse:
        return await _any_error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _any_error(request, BadRequest(_describe_validation(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": str(exc.detail), "code": code}, status_code=exc.status_code)

    async def read_body(request: Request) -> PredictRequest:
        raw = await read_limited_body(request, max_body_bytes)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedBody(
                f"body is not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc}"
            ) from exc
        try:
            return PredictRequest.model_validate(data)
        except ValidationError as exc:
            raise MalformedBody(_describe_validation(exc.errors(include_input=False))) from exc

    async def run_predict(request: Request, model_id: str, version: str | None) -> JSONResponse:
        # NOTE: latency is measured from here (body read and parse included) so /v1/stats is
        # as close as the server can get to what the client sees.
        started = time.perf_counter()
        given_id = request.headers.get(REQUEST_ID_HEADER)
        request_id = given_id or new_id()
        try:
            body = await read_body(request)
        except FleetError as exc:
            gateway.observe(request_id, None, exc.status_code, started, None)
            raise
        sticky = gateway.routing.sticky_header(model_id)
        result = await gateway.predict(
            model_id,
            body.inputs,
            version or body.version,
            request_id,
            started=started,
            sticky_key=request.headers.get(sticky) if sticky else None,
        )
        headers = {
            CACHE_HEADER: "hit" if result.resident else "miss",
            VERSION_HEADER: result.version,
        }
        if result.arm is not None:
            headers[ARM_HEADER] = result.arm
        if given_id is None:
            # NOTE: Ray Serve's proxy sets and echoes X-Request-Id itself; add it only when
            # no proxy did, so the response never carries it twice.
            headers[REQUEST_ID_HEADER] = request_id
        return JSONResponse(result.model_dump(), headers=headers)

    @app.post(
        "/v1/models/{model_id}/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_PREDICT_BODY,
    )
    async def predict(model_id: str, request: Request) -> JSONResponse:
        """Predict with the latest (or body `version`) version of `model_id`."""
        return await run_predict(request, model_id, None)

    @app.post(
        "/v1/models/{model_id}/versions/{version}/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_PREDICT_BODY,
    )
    async def predict_version(model_id: str, version: str, request: Request) -> JSONResponse:
        """Predict with a pinned version of `model_id`."""
        return await run_predict(request, model_id, version)

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_PREDICT_BODY,
    )
    async def predict_by_header(request: Request) -> JSONResponse:
        """Predict with the model named in the `serve_multiplexed_model_id` header."""
        model_id = request.headers.get(MODEL_ID_HEADER)
        if not model_id:
            raise BadRequest(f"missing the {MODEL_ID_HEADER} header naming the model")
        return await run_predict(request, model_id, None)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """Every published model with its versions (from the in-memory registry)."""
        return gateway.list_models()

    @app.get("/v1/models/{model_id}", response_model=ModelDetail, responses=_ERRORS)
    async def describe(model_id: str, request: Request, version: str | None = None) -> ModelDetail:
        """The manifest of `model_id` (latest version unless `?version=` is given), and
        where it is resident (when management is on and the caller may see it)."""
        detail = gateway.describe(model_id, version)
        if manager is not None and guard.allows(request):
            detail = detail.model_copy(update={"residency": await manager.residency(model_id)})
        return detail

    @app.post("/v1/models/{rest:path}", include_in_schema=False, responses=_ERRORS)
    async def invalid_model_path(rest: str) -> JSONResponse:
        """Any other POST under /v1/models/ names no valid model (e.g. `../x/predict`)."""
        raise InvalidModelId(
            f"invalid model path {rest[:80]!r}: use /v1/models/<model_id>/predict with an id "
            "of 1-128 characters from [A-Za-z0-9._-]"
        )

    @app.get("/v1/stats", response_model=StatsReport)
    async def stats(window_s: float | None = None) -> StatsReport:
        """Per model: requests, errors, hit rate, cold starts, p50/p95/p99 (all and warm)
        and load-wait p50, over the last `window_s` seconds, across ingress replicas."""
        if window_s is not None and not 0 < window_s <= 86400:
            raise BadRequest("window_s must be between 0 and 86400 seconds")
        return await asyncio.to_thread(gateway.stats, window_s or stats_window_s)

    @app.get("/v1/routing")
    async def routing() -> dict[str, Any]:
        """The active routing (aliases, default versions, pool rules, pins), the last
        refused routing config with the reason, and per-arm request counters (merged
        across ingress replicas: reading the peers' is a GCS call, off the event loop)."""
        return await asyncio.to_thread(gateway.routing_report)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 once the registry has been read; 503 before."""
        age = gateway.registry.age_s
        body = {
            "status": "ok" if age is not None else "starting",
            "models": gateway.registry.model_count,
            "registry_age_s": None if age is None else round(age, 3),
            "registry_error": gateway.registry.last_error,
        }
        return JSONResponse(body, status_code=200 if age is not None else 503)

    return app


_PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
    }
}


def _describe_validation(errors: Any) -> str:
    parts = []
    for err in list(errors)[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)
