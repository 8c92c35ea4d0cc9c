"""The native HTTP routes (a FastAPI router) over a `Gateway`.

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
    GET  /healthz                                        liveness + registry state
A model id may be `id`, `id@version` or an alias; on an alias, the header the routing
config names (default `X-User-Id`) keeps a caller on one arm, and `X-Fleet-Arm` says
which arm served. Any other POST under /v1/models/ is a 400 `invalid_model_id`; that
catch-all must come after every other router's /v1/models/... POST routes (see
`serve_app.api.app`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from serve_app.api.auth import Authorizer
from serve_app.api.body import BodyReader
from serve_app.api.management import ManagementGuard
from serve_app.api.params import (
    VERSION_PATTERN,
    ModelId,
    ModelName,
    PathVersion,
    QueryVersion,
    model_header,
)
from serve_app.errors import BadRequest, FleetError, InvalidModelId
from serve_app.gateway.gateway import Gateway, new_id
from serve_app.gateway.routing_table import Route
from serve_app.host.predictor import MAX_TEXT_CHARS, element_limit
from serve_app.management.manager import ModelManager
from serve_app.observability.stats import StatsReport
from serve_app.schemas import ErrorBody, ModelDetail, ModelList, PredictRequest, PredictResponse

# NOTE: the same header Ray Serve's proxy reads for model multiplexing
# (Serve's constant SERVE_MULTIPLEXED_MODEL_ID); a test pins the equality.
MODEL_ID_HEADER = "serve_multiplexed_model_id"
CACHE_HEADER = "X-Fleet-Cache"
VERSION_HEADER = "X-Fleet-Model-Version"
REQUEST_ID_HEADER = "X-Request-Id"
ARM_HEADER = "X-Fleet-Arm"

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody}
    for status in (400, 401, 403, 404, 413, 422, 429, 500, 502, 503, 507)
}


def predict_body(max_rows: int) -> dict[str, Any]:
    """The documented request body of the predict routes: `PredictRequest` plus the limits
    the server checks (1 to `max_rows` inputs, rows of numbers or texts of at most
    MAX_TEXT_CHARS characters, a version name's pattern), with a demo-fleet example."""
    schema = PredictRequest.model_json_schema()
    schema["properties"]["inputs"].update(
        minItems=1,
        maxItems=max_rows,
        items={
            "anyOf": [
                {"type": "array", "items": {"type": "number"}, "minItems": 1},
                {"type": "string", "maxLength": MAX_TEXT_CHARS},
            ]
        },
    )
    schema["properties"]["version"]["anyOf"][0]["pattern"] = VERSION_PATTERN
    example = {"inputs": [[0.1] * 32]}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema, "example": example}},
        }
    }


def native_router(
    gateway: Gateway,
    body: BodyReader,
    stats_window_s: float,
    manager: ModelManager | None,
    guard: ManagementGuard,
    auth: Authorizer | None = None,
) -> APIRouter:
    """The native routes (see module docstring), reading bodies with `body`.

    `GET /v1/models/{model_id}` adds residency when a `manager` is given and `guard`
    allows the caller. With tenants (`auth`), predict and per-model routes need a key in
    scope, the listing shows the caller's models only, and stats need the admin key.
    """
    auth = auth or Authorizer(None)
    router = APIRouter()
    _add_predict_routes(router, gateway, body, auth)
    _add_model_routes(router, gateway, manager, guard, auth)
    _add_ops_routes(router, gateway, stats_window_s, guard, auth)
    return router


def _add_predict_routes(
    router: APIRouter, gateway: Gateway, body: BodyReader, auth: Authorizer
) -> None:
    """The three predict routes; the model id comes from the path or the header."""
    documented = predict_body(gateway.config.max_batch_rows)

    @router.post(
        "/v1/models/{model_id}/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        openapi_extra=documented,
    )
    async def predict(model_id: ModelName, request: Request) -> JSONResponse:
        """Predict with the latest (or body `version`) version of `model_id`."""
        auth.authorize(request, model_id)
        return await _predict(gateway, body, request, model_id, None)

    @router.post(
        "/v1/models/{model_id}/versions/{version}/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        openapi_extra=documented,
    )
    async def predict_version(
        model_id: ModelId, version: PathVersion, request: Request
    ) -> JSONResponse:
        """Predict with a pinned version of `model_id`."""
        auth.authorize(request, model_id, version)
        return await _predict(gateway, body, request, model_id, version)

    @router.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        openapi_extra=documented,
    )
    async def predict_by_header(
        request: Request,
        model_id: Annotated[str, model_header(MODEL_ID_HEADER)],
    ) -> JSONResponse:
        """Predict with the model named in the `serve_multiplexed_model_id` header."""
        auth.authorize(request, model_id)
        return await _predict(gateway, body, request, model_id, None)


async def _predict(
    gateway: Gateway, body: BodyReader, request: Request, model_id: str, version: str | None
) -> JSONResponse:
    """Resolve the model (an unknown one is a 404 whatever the body), read the body,
    predict through the gateway, answer with the cache/version/arm headers."""
    # NOTE: latency is measured from here (body read and parse included) so /v1/stats is
    # as close as the server can get to what the client sees.
    started = time.perf_counter()
    given_id = request.headers.get(REQUEST_ID_HEADER)
    request_id = given_id or new_id()
    sticky_key = gateway.sticky_key(model_id, request.headers)
    route: Route | None = None
    try:
        route = gateway.resolve(model_id, version, sticky_key)
        limit = element_limit(route.manifest, gateway.config.max_batch_rows)
        parsed = await body.model(request, PredictRequest, max_tokens=2 * limit + 64)
    except FleetError as exc:
        gateway.observe(request_id, route and route.manifest, exc.status_code, started, None)
        raise
    if version is None and parsed.version is not None:
        # NOTE: a version named in the body: the model was checked above, now the version.
        route = None
    result = await gateway.predict(
        model_id,
        parsed.inputs,
        version or parsed.version,
        request_id,
        started=started,
        sticky_key=sticky_key,
        route=route,
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


def _add_model_routes(
    router: APIRouter,
    gateway: Gateway,
    manager: ModelManager | None,
    guard: ManagementGuard,
    auth: Authorizer,
) -> None:
    """The registry listing, one model's manifest, and the invalid-path catch-all."""

    @router.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        """Every published model with its versions (from the in-memory registry); with
        tenants, only those the caller's key may call."""
        listing = gateway.list_models()
        if auth.tenants is None:
            return listing
        visible = set(
            auth.tenants.visible(auth.caller(request), (m.model_id for m in listing.models))
        )
        models = [m for m in listing.models if m.model_id in visible]
        return listing.model_copy(update={"models": models, "count": len(models)})

    @router.get("/v1/models/{model_id}", response_model=ModelDetail, responses=ERRORS)
    async def describe(
        model_id: ModelId, request: Request, version: QueryVersion = None
    ) -> ModelDetail:
        """The manifest of `model_id` (latest version unless `?version=` is given), and
        where it is resident (when management is on and the caller may see it)."""
        auth.authorize(request, model_id, version)
        detail = gateway.describe(model_id, version)
        if manager is not None and guard.allows(request):
            detail = detail.model_copy(update={"residency": await manager.residency(model_id)})
        return detail

    @router.post("/v1/models/{rest:path}", include_in_schema=False, responses=ERRORS)
    async def invalid_model_path(rest: str) -> JSONResponse:
        """Any other POST under /v1/models/ names no valid model (e.g. `../x/predict`)."""
        raise InvalidModelId(
            f"invalid model path {rest[:80]!r}: use /v1/models/<model_id>/predict with an id "
            "of 1-128 characters from [A-Za-z0-9._-]"
        )


def _add_ops_routes(
    router: APIRouter,
    gateway: Gateway,
    stats_window_s: float,
    guard: ManagementGuard,
    auth: Authorizer,
) -> None:
    """Statistics, the routing report and the health check."""

    @router.get("/v1/stats", response_model=StatsReport)
    async def stats(
        request: Request,
        window_s: Annotated[float | None, Query(gt=0, le=86400, examples=[300])] = None,
    ) -> StatsReport:
        """Per model: requests, errors, hit rate, cold starts, p50/p95/p99 (all and warm)
        and load-wait p50, over the last `window_s` seconds, across ingress replicas; with
        tenants, one row per tenant too (and the admin key is needed)."""
        auth.require_admin(request)
        if window_s is not None and not 0 < window_s <= 86400:
            raise BadRequest("window_s must be between 0 and 86400 seconds")
        report = await asyncio.to_thread(gateway.stats, window_s or stats_window_s)
        if auth.enabled:
            tenants = await asyncio.to_thread(auth.stats, window_s or stats_window_s)
            report = report.model_copy(update={"tenants": tenants})
        return report

    @router.get("/v1/routing")
    async def routing(request: Request) -> dict[str, Any]:
        """The active routing (aliases, default versions, pool rules, pins), the last
        refused routing config with the reason, and per-arm request counters (merged
        across ingress replicas: reading the peers' is a GCS call, off the event loop).
        The refused config itself (it may hold anything) is shown to admins only."""
        auth.require_admin(request)
        report = await asyncio.to_thread(gateway.routing_report)
        if report.get("rejected") and not guard.allows(request):
            report["rejected"] = {**report["rejected"], "config": None}
        return report

    @router.get("/healthz")
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
