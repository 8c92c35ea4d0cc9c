"""Open Inference Protocol v2 routes (KServe / Triton HTTP) over the gateway.

Routes (the `/versions/{v}` segment is optional wherever it appears):
    GET  /v2                                        server metadata
    GET  /v2/health/live, /v2/health/ready          server liveness / readiness
    GET  /v2/models/{m}[/versions/{v}]              model metadata (tensors from the task)
    GET  /v2/models/{m}[/versions/{v}]/ready        200 when published (loads on demand)
    POST /v2/models/{m}[/versions/{v}]/infer        inference (JSON and binary tensors)
    POST /v2/repository/index                       every version and whether it is resident
    POST /v2/repository/models/{m}/load|unload      prewarm on one replica / unload everywhere
A model name may be an id, `id@version` or an alias: every route resolves it through the
gateway's routing (aliases with sticky keys and shadows, default versions), as the native
API does, and the infer route resolves it before it reads the body, so an unknown model is
a 404 whatever the body holds; the resolved model's element limit then bounds the decode,
which runs off the event loop for large or compressed bodies.
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
from serve_app.api.body import BodyReader, compress, decompress, off_loop
from serve_app.api.management import ManagementGuard
from serve_app.api.params import HeaderLength, ModelId, ModelName, PathVersion
from serve_app.api.v2_codec import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_response,
    parse_infer_request,
)
from serve_app.api.v2_header import EarlyCheck
from serve_app.api.v2_schemas import (
    INFER_EXAMPLE,
    InferRequestBody,
    RepositoryRequest,
    request_body,
)
from serve_app.api.v2_tasks import model_metadata, to_model_inputs, to_output_tensors
from serve_app.errors import BadRequest, FleetError, NotSupported, StorageUnavailable
from serve_app.gateway.gateway import Gateway, new_id
from serve_app.gateway.routing_table import Route
from serve_app.host.predictor import element_limit
from serve_app.management.manager import ModelManager
from serve_app.schemas import ErrorBody
from serve_app.storage.registry import Registry

SERVER_NAME = "fleetserve"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
REQUEST_ID_HEADER = "X-Request-Id"
ARM_HEADER = "X-Fleet-Arm"
COMPRESS_OVER_BYTES = 1024
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 422, 500, 502, 503, 507)
}


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
    _add_model_routes(router, gateway, auth)
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


def _add_model_routes(router: APIRouter, gateway: Gateway, auth: Authorizer) -> None:
    """Model metadata and readiness (and the server-wide statistics, refused)."""

    @router.get("/v2/models/stats", responses=ERRORS)
    async def all_stats() -> None:
        """Triton's statistics extension is not served (400); see GET /v1/stats."""
        raise NotSupported("/v2/models/stats is not served; GET /v1/stats has per-model stats")

    def metadata(request: Request, model: str, version: str | None) -> dict[str, Any]:
        auth.authorize(request, model, version)
        manifest = gateway.resolve(model, version).manifest
        return model_metadata(manifest, gateway.registry.versions(manifest.model_id))

    def ready(request: Request, model: str, version: str | None) -> dict[str, Any]:
        auth.authorize(request, model, version)
        manifest = gateway.resolve(model, version).manifest
        return {"name": manifest.model_id, "version": manifest.version, "ready": True}

    @router.get("/v2/models/{model}", responses=ERRORS)
    async def model_metadata_default(model: ModelName, request: Request) -> dict[str, Any]:
        """Inputs and outputs (name, datatype, shape; -1 = any) of the default version."""
        return metadata(request, model, None)

    @router.get("/v2/models/{model}/versions/{version}", responses=ERRORS)
    async def model_metadata_version(
        model: ModelId, version: PathVersion, request: Request
    ) -> dict[str, Any]:
        """Inputs and outputs (name, datatype, shape; -1 = any) of a model version."""
        return metadata(request, model, version)

    @router.get("/v2/models/{model}/ready", responses=ERRORS)
    async def model_ready_default(model: ModelName, request: Request) -> dict[str, Any]:
        """200 when the default version is published: served, loading on first use."""
        return ready(request, model, None)

    @router.get("/v2/models/{model}/versions/{version}/ready", responses=ERRORS)
    async def model_ready_version(
        model: ModelId, version: PathVersion, request: Request
    ) -> dict[str, Any]:
        """200 when the version is published: it is served, loading on first use."""
        return ready(request, model, version)


def _add_infer_route(
    router: APIRouter, gateway: Gateway, body: BodyReader, auth: Authorizer
) -> None:
    """Inference: resolve, decode, predict through the gateway, encode."""
    documented = request_body(InferRequestBody, INFER_EXAMPLE)

    @router.post("/v2/models/{model}/infer", responses=ERRORS, openapi_extra=documented)
    async def infer(
        model: ModelName, request: Request, header_length: HeaderLength = None
    ) -> Response:
        """Run the model's default version on V2 tensors; JSON or binary data both ways."""
        return await _infer(gateway, body, auth, request, model, None)

    @router.post(
        "/v2/models/{model}/versions/{version}/infer", responses=ERRORS, openapi_extra=documented
    )
    async def infer_version(
        model: ModelId, version: PathVersion, request: Request, header_length: HeaderLength = None
    ) -> Response:
        """Run a model version on V2 tensors; JSON or binary tensor data both ways."""
        return await _infer(gateway, body, auth, request, model, version)


async def _infer(
    gateway: Gateway,
    body: BodyReader,
    auth: Authorizer,
    request: Request,
    model: str,
    version: str | None,
) -> Response:
    """Authorize the caller for `model` (tenants), resolve it (404 before the body is
    read), decode within its element limit, predict through the gateway, encode."""
    auth.authorize(request, model, version)
    started = time.perf_counter()
    given_id = request.headers.get(REQUEST_ID_HEADER)
    request_id = given_id or new_id()
    route: Route | None = None
    try:
        route = _route(gateway, request, model, version)
        rows = gateway.config.max_batch_rows
        limits = (element_limit(route.manifest, rows), rows)
        parsed = await _read_infer_request(request, body, limits)
        inputs = to_model_inputs(route.manifest, parsed)
    except FleetError as exc:
        manifest = None if route is None else route.manifest
        gateway.observe(request_id, manifest, exc.status_code, started, None)
        raise
    manifest = route.manifest
    result = await gateway.predict(
        model, inputs, request_id=request_id, started=started, route=route
    )
    encoded, header_length = encode_infer_response(
        manifest.model_id, result.version, parsed, to_output_tensors(manifest, result.outputs)
    )
    return _infer_response(
        request, encoded, header_length, None if given_id is not None else request_id, route
    )


def _route(gateway: Gateway, request: Request, model: str, version: str | None) -> Route:
    """Where a V2 request for `model` goes, decided before its body is read: the same
    routing as the native API (aliases, their sticky header, shadows, default versions).

    Raises:
        FleetError: 400 for a malformed name, 404 for an unknown model or version.
    """
    return gateway.resolve(model, version, gateway.sticky_key(model, request.headers))


async def _read_infer_request(
    request: Request, body: BodyReader, limits: tuple[int, int]
) -> InferRequest:
    """The decoded inference request: size limit, Content-Encoding, `limits` (the most
    elements of a tensor, and of a BYTES tensor: one text or encoded file per row);
    decoded in a worker thread when large or compressed."""
    raw = await body.raw(request)
    header_length = request.headers.get(HEADER_LENGTH)
    encoding = request.headers.get("content-encoding")
    size = body.max_bytes if encoding else len(raw)
    return await off_loop(size, _decode, raw, encoding, header_length, body.max_bytes, limits)


def _decode(
    raw: bytes,
    encoding: str | None,
    header_length: str | None,
    max_bytes: int,
    limits: tuple[int, int],
) -> InferRequest:
    # NOTE: the header (or, without binary data, the token budget) is checked while the
    # body inflates: a body that is already refused is never inflated in full.
    values, items = limits
    body = decompress(raw, encoding, max_bytes, EarlyCheck(header_length, values, items))
    return parse_infer_request(body, header_length, values, items)


def _infer_response(
    request: Request,
    encoded: bytes,
    header_length: int | None,
    request_id: str | None,
    route: Route,
) -> Response:
    """The HTTP response for an encoded inference result: binary header length, request id
    (only when no proxy set one), the alias arm that served, compressed when large and the
    client accepts it."""
    headers = {}
    if header_length is not None:
        headers[HEADER_LENGTH] = str(header_length)
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    if route.arm is not None:
        headers[ARM_HEADER] = route.arm
    if len(encoded) > COMPRESS_OVER_BYTES:
        encoded, encoding = compress(encoded, request.headers.get("accept-encoding"))
        if encoding is not None:
            headers["Content-Encoding"] = encoding
    media = "application/json" if header_length is None else "application/octet-stream"
    return Response(encoded, media_type=media, headers=headers)


def _add_unsupported_routes(router: APIRouter) -> None:
    """Triton extensions that are not served (400 `not_supported`)."""

    def refuse(request: Request) -> None:
        raise NotSupported(
            f"{request.url.path} is a Triton extension fleetserve does not serve; "
            "see GET /v2/models/{model} for metadata and GET /v1/stats for statistics"
        )

    @router.get("/v2/models/{model}/config", responses=ERRORS)
    async def model_config(model: ModelName, request: Request) -> None:
        """Triton's model configuration extension is not served (400 `not_supported`)."""
        refuse(request)

    @router.get("/v2/models/{model}/versions/{version}/config", responses=ERRORS)
    async def model_version_config(model: ModelId, version: PathVersion, request: Request) -> None:
        """Triton's model configuration extension is not served (400 `not_supported`)."""
        refuse(request)

    @router.get("/v2/models/{model}/stats", responses=ERRORS)
    async def model_stats(model: ModelName, request: Request) -> None:
        """Triton's statistics extension is not served (400); see GET /v1/stats."""
        refuse(request)

    @router.get("/v2/models/{model}/versions/{version}/stats", responses=ERRORS)
    async def model_version_stats(model: ModelId, version: PathVersion, request: Request) -> None:
        """Triton's statistics extension is not served (400); see GET /v1/stats."""
        refuse(request)


def _add_repository_routes(
    router: APIRouter, body: BodyReader, manager: ModelManager | None, guard: ManagementGuard
) -> None:
    """The model repository extension, over the model manager and its guard."""

    documented = request_body(RepositoryRequest)

    @router.post("/v2/repository/index", responses=ERRORS, openapi_extra=documented)
    async def repository_index(request: Request) -> list[dict[str, Any]]:
        """Every published version: READY (resident), LOADING or UNAVAILABLE."""
        guard.check(request)
        options = await body.optional_object(request)
        index = await _manager(manager).repository_index()
        if options.get("ready"):
            index = [entry for entry in index if entry["state"] == "READY"]
        return index

    @router.post("/v2/repository/models/{model}/load", responses=ERRORS, openapi_extra=documented)
    async def repository_load(model: ModelId, request: Request) -> dict[str, Any]:
        """Load the latest version on one replica (as `POST /v1/models/{m}/load`)."""
        guard.check(request)
        options = await body.optional_object(request)
        parameters = options.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest("'parameters' must be a JSON object")
        if (parameters or {}).get("config") is not None:
            raise NotSupported("loading with an override config is not supported")
        await _manager(manager).load(model)
        return {}

    @router.post("/v2/repository/models/{model}/unload", responses=ERRORS, openapi_extra=documented)
    async def repository_unload(model: ModelId, request: Request) -> dict[str, Any]:
        """Unload every version from every replica (as `POST /v1/models/{m}/unload`)."""
        guard.check(request)
        await body.optional_object(request)
        await _manager(manager).unload(model)
        return {}


def _manager(manager: ModelManager | None) -> ModelManager:
    if manager is None:
        raise NotSupported("this server has no model management")
    return manager
