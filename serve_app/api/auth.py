"""The tenant check of the HTTP routes, and per-tenant accounting of their answers.

Every inference route starts with `authorizer.authorize(request, model, version)`: before
the model is resolved or the body read, so a refused request costs no parsing and never
causes a load. With no tenants configured it returns None at once (inference stays open).
`TenantAccounting` (an ASGI middleware, installed only with tenants) records each such
request's status and latency under its principal (`serve_app.auth.ledger`, Prometheus).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.auth.keys import bearer_token
from serve_app.auth.ledger import TenantLedger, outcome_of, summarise_tenants
from serve_app.auth.tenants import ADMIN, ANONYMOUS, Principal, Tenants
from serve_app.errors import Unauthorized
from serve_app.observability.metrics import TenantMetrics
from serve_app.observability.stats import TenantStats

SCOPE_KEY = "fleet.tenant"  # the ASGI scope entry naming the request's principal


class Authorizer:
    """Tenant checks for HTTP requests (see module docstring)."""

    def __init__(
        self,
        tenants: Tenants | None,
        ledger: TenantLedger | None = None,
        metrics: TenantMetrics | None = None,
        peers: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        """`peers` gives the other ingress replicas' published snapshots (their ledgers
        under `tenants`)."""
        self.tenants = tenants if tenants is not None and tenants.enabled else None
        self.ledger = ledger or TenantLedger()
        self.metrics = metrics
        self._peers = peers

    @property
    def enabled(self) -> bool:
        """Whether tenants are configured (then inference needs a key)."""
        return self.tenants is not None

    def authorize(
        self, request: Request, name: str, version: str | None = None
    ) -> Principal | None:
        """Check the request's key, rate and scope for model `name`; None when open.

        Raises:
            Unauthorized: no valid key (401).
            OutOfScope: `name` is outside the key's scope or unknown (403).
            RateLimited: over the tenant's rate (429).
        """
        if self.tenants is None:
            return None
        principal = self.caller(request)
        self.tenants.authorize(principal, name, version)
        return principal

    def caller(self, request: Request) -> Principal:
        """The principal of the request's key (accounted from now on).

        Raises:
            Unauthorized: no valid key (401).
        """
        assert self.tenants is not None
        request.scope[SCOPE_KEY] = ANONYMOUS
        principal = self.tenants.authenticate(bearer_token(request.headers.get("authorization")))
        request.scope[SCOPE_KEY] = principal.name
        return principal

    def require_admin(self, request: Request) -> None:
        """With tenants, fleet-wide views (stats, routing) are the admin's.

        Raises:
            Unauthorized: the request does not carry the admin key (401).
        """
        if self.tenants is not None and self.caller(request).name != ADMIN:
            raise Unauthorized("with tenants configured, this view needs the admin key")

    def stats(self, window_s: float) -> list[TenantStats]:
        """Per-tenant rows over `window_s`, across ingress replicas (blocking: a GCS read)."""
        peers = [] if self._peers is None else [p.get("tenants") or {} for p in self._peers()]
        return summarise_tenants([self.ledger.snapshot(), *peers], window_s)

    def account(self, tenant: str, status: int, latency_ms: float) -> None:
        """Record one finished request of `tenant`."""
        self.ledger.record(tenant, status, latency_ms)
        if self.metrics is not None:
            self.metrics.observe(tenant, outcome_of(status), latency_ms)


class TenantAccounting:
    """ASGI middleware: accounts every request that went through `Authorizer.caller`."""

    def __init__(self, app: ASGIApp, authorizer: Authorizer) -> None:
        self.app = app
        self.authorizer = authorizer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            tenant: Any = scope.get(SCOPE_KEY)
            if tenant is not None:
                self.authorizer.account(tenant, status, (time.perf_counter() - started) * 1000)
