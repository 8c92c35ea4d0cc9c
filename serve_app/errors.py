"""Typed errors of fleetserve, each with its HTTP status and a stable snake_case code.

Every error a user can see is a `FleetError` subclass. The status code and the error code
live on the class; `error_response()` is the one place that turns an exception into the JSON
body `{"error": "<message>", "code": "<code>"}`. Errors cross Ray actor boundaries, so each
class keeps its constructor arguments in `self.args` and unpickles with `cls(*args)`.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

logger = logging.getLogger(__name__)


class FleetError(Exception):
    """Base of all user-visible errors: a message, an HTTP status and a stable code."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    # NOTE: failures a cache should remember briefly (see ModelCache.failure_ttl_s).
    remember: ClassVar[bool] = True

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        # NOTE: args must be exactly the constructor's arguments so pickle (cls(*args)) works.
        super().__init__(message, retry_after_s)
        self.message = message
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return self.message

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers for this error (Retry-After for transient ones)."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class BadRequest(FleetError):
    """The request itself is malformed (400)."""

    status_code = 400
    code = "bad_request"


class InvalidModelId(BadRequest):
    """The model id is not `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` (400)."""

    code = "invalid_model_id"


class InvalidVersion(BadRequest):
    """The version string is not a valid version name (400)."""

    code = "invalid_version"


class MalformedBody(BadRequest):
    """The body is not valid JSON or not the expected envelope (400)."""

    code = "malformed_body"


class EmptyInputs(BadRequest):
    """`inputs` is present but empty (400)."""

    code = "empty_inputs"


class InvalidRouting(BadRequest):
    """A routing config (aliases, splits, pool rules, pins) that cannot be applied (400)."""

    code = "invalid_routing"


class Unauthorized(FleetError):
    """Missing or wrong credentials (401)."""

    status_code = 401
    code = "unauthorized"


class Forbidden(FleetError):
    """The caller may not use this endpoint (403)."""

    status_code = 403
    code = "forbidden"


class ManagementDisabled(Forbidden):
    """The management endpoints are turned off in config (403)."""

    code = "management_disabled"


class AdminKeyRequired(Forbidden):
    """Management is locked: no admin key is configured and unauthenticated management
    is not allowed (403)."""

    code = "admin_key_required"


class OutOfScope(Forbidden):
    """The caller's key does not cover this model (403); the same for unknown models."""

    code = "out_of_scope"


class PinnedByConfig(FleetError):
    """A management unpin/unload met a pin that the config's routing set (409): only a
    config change removes it."""

    status_code = 409
    code = "pinned_by_config"
    remember = False


class RateLimited(FleetError):
    """The tenant sent more requests than its rate allows (429, with Retry-After)."""

    status_code = 429
    code = "rate_limited"
    remember = False


class ColdLoadLimited(RateLimited):
    """The tenant already has its maximum of cold loads in flight (429, Retry-After)."""

    code = "cold_load_limit"


class NotSupported(BadRequest):
    """A protocol feature fleetserve does not serve (400), e.g. Triton's model config."""

    code = "not_supported"


class ModelNotFound(FleetError):
    """No model with this id is published (404)."""

    status_code = 404
    code = "model_not_found"


class VersionNotFound(FleetError):
    """The model exists, but not in the requested version (404)."""

    status_code = 404
    code = "version_not_found"


class VersionExists(FleetError):
    """Publishing refused: versions are immutable and this one exists (409)."""

    status_code = 409
    code = "version_exists"


class PayloadTooLarge(FleetError):
    """The request body exceeds the configured limit (413)."""

    status_code = 413
    code = "payload_too_large"


class InvalidInput(FleetError):
    """The inputs are well-formed JSON but do not fit the model (422)."""

    status_code = 422
    code = "invalid_input"
    remember = False


class InvalidImage(InvalidInput):
    """An image input that cannot be decoded, or has an unsupported format or mode (422)."""

    code = "invalid_image"


class ImageTooLarge(PayloadTooLarge):
    """An image whose dimensions are over the pixel caps, found before decoding (413)."""

    code = "image_too_large"
    remember = False


class ArtifactCorrupt(FleetError):
    """A model artifact contradicts its manifest: a file does not match its sha256, or the
    weights do not fit the declared architecture (502)."""

    status_code = 502
    code = "artifact_corrupt"


class StorageUnavailable(FleetError):
    """The model store cannot be reached; retry later (503)."""

    status_code = 503
    code = "storage_unavailable"


class LoadTimeout(FleetError):
    """Loading the model, or waiting for room in the cache, took too long (503)."""

    status_code = 503
    code = "load_timeout"


class NoRoom(LoadTimeout):
    """Every resident model stayed in use (or pinned) until the load's deadline (503).

    Not remembered: it says nothing about the model, only about the cache at that moment.
    """

    code = "no_room"
    remember = False


class ReplicaUnavailable(FleetError):
    """A model-host replica did not answer a management command in time, or was lost
    while handling a request (its actor, worker process or node died) (503)."""

    status_code = 503
    code = "replica_unavailable"
    remember = False


class CommandMisrouted(FleetError):
    """A management command reached another replica than the one it names (409).

    The router sends commands to the replica they name; this guards the rare case where
    Serve hands a request to another replica. The sender retries.
    """

    status_code = 409
    code = "command_misrouted"
    remember = False


class NotResidentHere(FleetError):
    """A grouped call (`ReplicaBatch`) named a model its replica no longer holds (evicted
    since it last reported it) (503). The host does not load it inside the group, which
    would hold every other model's requests for the load; the ingress resends those
    requests on the per-model path, which loads it. Never reaches a client."""

    status_code = 503
    code = "not_resident_here"
    remember = False


class ModelTooLarge(FleetError):
    """The model needs more bytes than the replica's whole memory budget (507)."""

    status_code = 507
    code = "model_too_large"


class ModelLoadFailed(FleetError):
    """The artifact could not be turned into a model: a server-side fault (500)."""

    status_code = 500
    code = "model_load_failed"


# NOTE: how long a client should wait after a lost replica: Serve starts a replacement
# (on a surviving node) within seconds, and the router stops picking the dead one sooner.
LOST_REPLICA_RETRY_S = 2.0


def unwrap(exc: BaseException) -> BaseException:
    """Return the user-level exception behind a Ray wrapper, if any.

    Serve handles raise `RayTaskError` around the replica's exception; its `cause` is the
    original typed error. Unwrapping is done here, once, by type, never by message. What Ray
    raises when the replica itself is gone (its actor, worker or node died: a lost node)
    becomes a `ReplicaUnavailable` (503 with Retry-After), see `lost_replica`.
    """
    try:
        from ray.exceptions import RayTaskError
    except ImportError:  # pragma: no cover - ray is a hard dependency, kept optional here
        return exc
    while isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException):
            break
        exc = cause
    return lost_replica(exc) or exc


def _lost_replica_types() -> tuple[type[BaseException], ...]:
    """Ray's (and, where loaded, Serve's) exceptions for a replica that no longer exists."""
    import sys

    from ray import exceptions as ray_exc

    types: list[type[BaseException]] = [
        ray_exc.RayActorError,  # ActorDiedError, ActorUnavailableError
        ray_exc.WorkerCrashedError,
        ray_exc.NodeDiedError,
        ray_exc.LocalRayletDiedError,
        ray_exc.OwnerDiedError,
    ]
    # NOTE: the serving core never imports ray.serve; in a Serve process it is loaded.
    serve_exc = sys.modules.get("ray.serve.exceptions")
    if serve_exc is not None:
        types += [serve_exc.ReplicaUnavailableError, serve_exc.DeploymentUnavailableError]
    return tuple(types)


def lost_replica(exc: BaseException) -> ReplicaUnavailable | None:
    """A `ReplicaUnavailable` when `exc` is Ray saying the replica it called is gone (its
    actor, worker process or node died), else None."""
    try:
        types = _lost_replica_types()
    except ImportError:  # pragma: no cover - ray is a hard dependency
        return None
    if not isinstance(exc, types):
        return None
    return ReplicaUnavailable(
        f"the model-host replica handling this request was lost ({type(exc).__name__}); "
        "Serve is replacing it: retry",
        retry_after_s=LOST_REPLICA_RETRY_S,
    )


class PinRefused(FleetError):
    """Pinning the model would put the pinned bytes over the memory budget (507)."""

    status_code = 507
    code = "pin_exceeds_budget"
    remember = False


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception maps to (without logging it)."""
    exc = unwrap(exc)
    return exc.status_code if isinstance(exc, FleetError) else 500


def error_response(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Map any exception to (status, JSON body, headers): the single error mapping point."""
    exc = unwrap(exc)
    if isinstance(exc, FleetError):
        return exc.status_code, {"error": exc.message, "code": exc.code}, exc.headers()
    # NOTE: anything else is a bug in fleetserve; the body never carries a traceback.
    logger.error("unhandled error", exc_info=exc)
    return 500, {"error": "internal server error", "code": "internal_error"}, {}


def all_error_classes() -> list[type[FleetError]]:
    """Every FleetError subclass (for tests and docs)."""
    seen: list[type[FleetError]] = [FleetError]
    stack = list(FleetError.__subclasses__())
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen
