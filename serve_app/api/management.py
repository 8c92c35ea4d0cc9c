"""The management routes (FastAPI router) over a `ModelManager`, and their access guard.

Routes:
    GET    /v1/replicas                     every live model-host replica: budget, resident
                                            bytes, models, loads in flight, pins
    POST   /v1/models/{model_id}/load       prewarm (?version=, ?replicas=N)
    POST   /v1/models/{model_id}/unload     unpin + evict everywhere (?version=)
    PUT    /v1/models/{model_id}/pin        pin on every replica, kept across restarts
    DELETE /v1/models/{model_id}/pin        release the pin (?version=)
`GET /v1/models/{model_id}` adds residency when the guard allows it (serve_app/api/native.py).

`ingress.management.enabled: false` turns them all off (403 `management_disabled`). They
fail closed: they need `Authorization: Bearer <admin key>` (401 `unauthorized` otherwise),
the key from `ingress.management.admin_key` or FLEET_ADMIN_KEY (at least 16 characters,
else the deploy fails); with no admin key at all they answer 403 `admin_key_required`
unless `ingress.management.allow_unauthenticated: true`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from serve_app.api.params import ModelId, QueryVersion
from serve_app.auth.keys import KeyRing, bearer_token, hash_key
from serve_app.config import ManagementConfig
from serve_app.errors import AdminKeyRequired, ManagementDisabled, Unauthorized
from serve_app.management.manager import ModelManager
from serve_app.schemas import ManagementResult

ADMIN_KEY_HEADER = "Authorization"


class ManagementGuard:
    """Decides whether a request may use the management endpoints."""

    def __init__(self, config: ManagementConfig, available: bool = True) -> None:
        """Raises ValueError when FLEET_ADMIN_KEY is shorter than 16 characters."""
        self.enabled = config.enabled and available
        self.open = config.allow_unauthenticated
        key = config.resolved_admin_key()
        self.key_hash = None if key is None else hash_key(key)
        self._ring: KeyRing[bool] = KeyRing()
        if self.key_hash is not None:
            self._ring.add(self.key_hash, True)

    def check(self, request: Request) -> None:
        """Raise unless `request` may manage.

        Raises:
            ManagementDisabled: management is turned off (403).
            AdminKeyRequired: no admin key is configured and unauthenticated management
                is not allowed (403).
            Unauthorized: the request lacks the admin key (401).
        """
        if not self.enabled:
            raise ManagementDisabled(
                "the management endpoints are turned off (ingress.management.enabled)"
            )
        if self.key_hash is None:
            if self.open:
                return
            raise AdminKeyRequired(
                "management needs an admin key: set FLEET_ADMIN_KEY (or "
                "ingress.management.admin_key) for the ingress, or "
                "ingress.management.allow_unauthenticated: true"
            )
        if self._ring.find(bearer_token(request.headers.get(ADMIN_KEY_HEADER))) is None:
            raise Unauthorized("management calls need 'Authorization: Bearer <admin key>'")

    def allows(self, request: Request) -> bool:
        """Whether `request` may see management data (no exception)."""
        try:
            self.check(request)
        except (ManagementDisabled, AdminKeyRequired, Unauthorized):
            return False
        return True


def management_router(manager: ModelManager, guard: ManagementGuard) -> APIRouter:
    """The management routes (see module docstring)."""
    router = APIRouter(tags=["management"])

    @router.get("/v1/replicas")
    async def replicas(request: Request) -> list[dict[str, Any]]:
        """What every live model-host replica holds: budget, resident bytes, models,
        in-flight loads and pins."""
        guard.check(request)
        return await manager.replicas()

    @router.post("/v1/models/{model_id}/load", response_model=ManagementResult)
    async def load(
        model_id: ModelId,
        request: Request,
        version: QueryVersion = None,
        replicas: int = Query(1, ge=1, le=1024),
    ) -> ManagementResult:
        """Load (prewarm) the model on `replicas` replicas; latest version by default."""
        guard.check(request)
        return await manager.load(model_id, version, replicas)

    @router.post("/v1/models/{model_id}/unload", response_model=ManagementResult)
    async def unload(
        model_id: ModelId, request: Request, version: QueryVersion = None
    ) -> ManagementResult:
        """Unpin and evict the model from every replica (in-flight requests finish)."""
        guard.check(request)
        return await manager.unload(model_id, version)

    @router.put("/v1/models/{model_id}/pin", response_model=ManagementResult)
    async def pin(
        model_id: ModelId, request: Request, version: QueryVersion = None
    ) -> ManagementResult:
        """Pin the model on every replica (507 `pin_exceeds_budget` if it cannot fit)."""
        guard.check(request)
        return await manager.pin(model_id, version)

    @router.delete("/v1/models/{model_id}/pin", response_model=ManagementResult)
    async def unpin(
        model_id: ModelId, request: Request, version: QueryVersion = None
    ) -> ManagementResult:
        """Release the model's pin on every replica (it stays until evicted)."""
        guard.check(request)
        return await manager.unpin(model_id, version)

    return router
