"""Open Inference Protocol v2 routes (KServe / Triton HTTP) over the gateway.

Routes (the `/versions/{v}` segment is optional wherever it appears):
    GET  /v2                                        server metadata
    GET  /v2/health/live, /v2/health/ready          server liveness / readiness
    GET  /v2/models/{m}[/versions/{v}]              model metadata (tensors from the task)
    GET  /v2/models/{m}[/versions/{v}]/ready        200 when published (loads on demand)
    POST /v2/models/{m}[/versions/{v}]/infer        inference (JSON and binary tensors)
    POST /v2/repository/index                       every version and whether it is resident
    POST /v2/repository/models/{m}/load|unload      prewarm on one replica / unload everywhere
`v2_router()` puts together one small function per group of routes. The wire codec is
`serve_app.api.v2_codec`, the tensors of each task `serve_app.api.v2_tasks`, bodies (size
limit, gzip/deflate) `serve_app.api.body`; errors leave through the app's single mapping
as `{"error": ..., "code": ...}`, which V2 clients read.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve_app import __version__
from serve_app.api.auth import Authorizer
from serve_app.api.body import BodyReader, compress
from serve_app.api.management import ManagementGuard
from serve_app.api.v2_codec import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_response,
    parse_infer_request,
)
from serve_app.api.v2_tasks import model_metadata, to_model_inputs, to_output_tensors
from serve_app.errors import FleetError, NotSupported, StorageUnavailable
from serve_app.gateway.gateway import Gateway, new_id
from serve_app.management.manager import ModelManager
from serve_app.storage.manifest import Manifest
from serve_app.storage.registry import Registry

SERVER_NAME = "fleetserve"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
REQUEST_ID_HEADER = "X-Request-Id"
COMPRESS_OVER_BYTES = 1024


def v2_router(
    gateway: Gateway,
    body: BodyReader,
    manager: ModelManager | None,
    guard: ManagementGuard,
    auth: Authorizer | None = None,
) -> APIRouter:
    """The V2 routes (see module docstring), reading bodies with `body`; with tenants
    (`auth`), per-model routes need a key whose scope covers the model."""
    auth = auth or Authorizer(None)
    router = APIRouter(tags=["open inference protocol v2"])
    _add_server_routes(router, gateway.registry)
    _add_model_routes(router, gateway.registry, auth)
    _add_infer_route(router, gateway, body, auth)
    _add_unsupported_routes(router)
    _add_repository_routes(router, body, manager, guard)
    return router


def _add_server_routes(router: APIRouter, registry: Registry) -> None:
    """Server metadata and health."""

    @router.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        """Server name, version and protocol extensions."""
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    @router.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        """200 while the server runs."""
        return {"live": True}

    @router.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        """200 once the model registry has been read (models load on demand), else 503."""
        if registry.age_s is None:
            raise StorageUnavailable(
                "not ready: the model registry has not been read yet", retry_after_s=2.0
            )
        return {"ready": True}


def _add_model_routes(router: APIRouter, registry: Registry, auth: Authorizer) -> None:
    """Model metadata and readiness (and the server-wide statistics, refused)."""

    @router.get("/v2/models/stats")
    async def all_stats() -> None:
        """Triton's statistics extension is not served (400); see GET /v1/stats."""
        raise NotSupported("/v2/models/stats is not served; GET /v1/stats has per-model stats")

    @router.get("/v2/models/{model}")
    @router.get("/v2/models/{model}/versions/{version}")
    async def metadata(model: str, request: Request, version: str | None = None) -> dict[str, Any]:
        """Inputs and outputs (name, datatype, shape; -1 = any) of a model version."""
        auth.authorize(request, model, version)
        manifest = registry.resolve(model, version)
        return model_metadata(manifest, registry.versions(model))

    @router.get("/v2/models/{model}/ready")
    @router.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(
        model: str, request: Request, version: str | None = None
    ) -> dict[str, Any]:
        """200 when the version is published: it is served, loading on first use."""
        auth.authorize(request, model, version)
        manifest = registry.resolve(model, version)
        return {"name": manifest.model_id, "version": manifest.version, "ready": True}


def _add_infer_route(
    router: APIRouter, gateway: Gateway, body: BodyReader, auth: Authorizer
) -> None:
    """Inference: decode, predict through the gateway, encode."""

    @router.post("/v2/models/{model}/infer")
    @router.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str | None = None) -> Response:
        """Run the model on V2 tensors; JSON or binary tensor data both ways."""
        auth.authorize(request, model, version)
        started = time.perf_counter()
        given_id = request.headers.get(REQUEST_ID_HEADER)
        request_id = given_id or new_id()
        manifest: Manifest | None = None
        try:
            parsed = await _read_infer_request(request, body)
            manifest = gateway.registry.resolve(model, version)
            inputs = to_model_inputs(manifest, parsed)
        except FleetError as exc:
            gateway.observe(request_id, manifest, exc.status_code, started, None)
            raise
        result = await gateway.predict(model, inputs, manifest.version, request_id, started=started)
        encoded, header_length = encode_infer_response(
            manifest.model_id, result.version, parsed, to_output_tensors(manifest, result.outputs)
        )
        return _infer_response(
            request, encoded, header_length, None if given_id is not None else request_id
        )


async def _read_infer_request(request: Request, body: BodyReader) -> InferRequest:
    """The decoded inference request (size limit and Content-Encoding applied)."""
    raw = await body.decoded(request)
    return parse_infer_request(raw, request.headers.get(HEADER_LENGTH))


def _infer_response(
    request: Request, encoded: bytes, header_length: int | None, request_id: str | None
) -> Response:
    """The HTTP response for an encoded inference result: binary header length, request id
    (only when no proxy set one), compressed when large and the client accepts it."""
    headers = {}
    if header_length is not None:
        headers[HEADER_LENGTH] = str(header_length)
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    if len(encoded) > COMPRESS_OVER_BYTES:
        encoded, encoding = compress(encoded, request.headers.get("accept-encoding"))
        if encoding is not None:
            headers["Content-Encoding"] = encoding
    media = "application/json" if header_length is None else "application/octet-stream"
    return Response(encoded, media_type=media, headers=headers)


def _add_unsupported_routes(router: APIRouter) -> None:
    """Triton extensions that are not served (400 `not_supported`)."""

    @router.get("/v2/models/{model}/config")
    @router.get("/v2/models/{model}/versions/{version}/config")
    @router.get("/v2/models/{model}/stats")
    @router.get("/v2/models/{model}/versions/{version}/stats")
    async def unsupported(request: Request) -> None:
        """Triton's model config and statistics extensions are not served (400)."""
        raise NotSupported(
            f"{request.url.path} is a Triton extension fleetserve does not serve; "
            "see GET /v2/models/{model} for metadata and GET /v1/stats for statistics"
        )


def _add_repository_routes(
    router: APIRouter, body: BodyReader, manager: ModelManager | None, guard: ManagementGuard
) -> None:
    """The model repository extension, over the model manager and its guard."""

    @router.post("/v2/repository/index")
    async def repository_index(request: Request) -> list[dict[str, Any]]:
        """Every published version: READY (resident), LOADING or UNAVAILABLE."""
        guard.check(request)
        options = await body.optional_object(request)
        index = await _manager(manager).repository_index()
        if options.get("ready"):
            index = [entry for entry in index if entry["state"] == "READY"]
        return index

    @router.post("/v2/repository/models/{model}/load")
    async def repository_load(model: str, request: Request) -> dict[str, Any]:
        """Load the latest version on one replica (as `POST /v1/models/{m}/load`)."""
        guard.check(request)
        options = await body.optional_object(request)
        if (options.get("parameters") or {}).get("config") is not None:
            raise NotSupported("loading with an override config is not supported")
        await _manager(manager).load(model)
        return {}

    @router.post("/v2/repository/models/{model}/unload")
    async def repository_unload(model: str, request: Request) -> dict[str, Any]:
        """Unload every version from every replica (as `POST /v1/models/{m}/unload`)."""
        guard.check(request)
        await body.optional_object(request)
        await _manager(manager).unload(model)
        return {}


def _manager(manager: ModelManager | None) -> ModelManager:
    if manager is None:
        raise NotSupported("this server has no model management")
    return manager
