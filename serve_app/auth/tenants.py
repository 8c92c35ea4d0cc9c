"""Tenants: who is calling (a key's owner), what it may call, and how much at once.

A `Principal` is a tenant from config, the admin (the management key: every model, no
limits) or a handle caller that named a tenant. `Tenants.authorize()` is the one check
every inference route makes before it resolves the model or reads the body:

- the request rate: a token bucket per tenant (`rate_per_s`, `burst`), 429 + Retry-After;
- the scope: the requested name must be one of the tenant's aliases, or a model id (not an
  alias) that matches one of its globs or whose manifest carries one of its tags. Anything
  else, an unknown model included, is the same 403 `out_of_scope`, whose message repeats
  only the requested name, so a 403 never tells whether a model exists.

Cold loads are capped where a request is dispatched to a host (`ColdLoads`, through
`Tenants.gate()`): a tenant may have at most `max_cold_loads` distinct models that are not
resident anywhere in flight; a request for another one is a 429 before it reaches a host, so
one tenant's cold storm cannot evict every other tenant's models. Residency comes from the
hosts' published state (`ResidencyView`, refreshed in the background).

The principal of the running request travels in a context variable (`current()`): set by
`authorize()`, read by the dispatch gate in the same task.
"""

from __future__ import annotations

import contextvars
import fnmatch
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from serve_app.auth.keys import KeyRing, read_hashes
from serve_app.auth.settings import AuthConfig, TenantConfig
from serve_app.errors import ColdLoadLimited, FleetError, OutOfScope, RateLimited, Unauthorized
from serve_app.storage.manifest import Manifest

logger = logging.getLogger(__name__)
ADMIN = "admin"
ANONYMOUS = "anonymous"
Call = TypeVar("Call")
Result = TypeVar("Result")


class Manifests(Protocol):
    """What scope checks need of the registry (in memory; never a store call)."""

    def resolve(self, model_id: str, version: str | None = None) -> Manifest:
        """The manifest of `model_id` at `version` (default latest)."""
        ...


class TokenBucket:
    """`rate` tokens per second, up to `burst`; thread-safe."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Take one token; returns 0.0 if granted, else the seconds until one is there."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / self.rate


class ColdLoads:
    """Distinct cold models one tenant has in flight, capped at `limit`."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._in_flight: dict[str, int] = {}

    @property
    def models(self) -> int:
        """Distinct cold models in flight now."""
        return len(self._in_flight)

    def enter(self, key: str) -> None:
        """Count a cold request for `key` (a model already loading for this tenant is free).

        Raises:
            ColdLoadLimited: `limit` other cold models are in flight (429).
        """
        full = self.limit is not None and len(self._in_flight) >= self.limit
        if full and key not in self._in_flight:
            raise ColdLoadLimited(
                f"this key already has {self.limit} cold model loads in flight; "
                "retry when they finish",
                retry_after_s=1.0,
            )
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def leave(self, key: str) -> None:
        """The cold request for `key` finished."""
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)


@dataclass
class Principal:
    """Who a request runs for: a tenant (with scope and limits), or the admin."""

    name: str
    config: TenantConfig | None = None  # None: the admin (every model, no limits)
    bucket: TokenBucket | None = None
    cold: ColdLoads = field(default_factory=lambda: ColdLoads(None))

    def allows(self, name: str, is_alias: bool, manifests: Manifests, version: str | None) -> bool:
        """Whether the requested `name` (an id, `id@version` or alias) is in scope."""
        scope = self.config
        if scope is None:
            return True
        if is_alias:
            return name in scope.aliases
        model_id, _, at = name.partition("@")
        if any(fnmatch.fnmatchcase(model_id, glob) for glob in scope.models):
            return True
        if not scope.tags:
            return False
        try:
            manifest = manifests.resolve(model_id, version or at or None)
        except FleetError:
            return False  # NOTE: unknown model: the same 403 as any other out-of-scope name
        return any(tag in scope.tags for tag in manifest.tags)


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "fleet_principal", default=None
)


def current() -> Principal | None:
    """The principal of the running request (None: open access, or no tenant named)."""
    return _current.get()


class ResidencyView:
    """Model keys resident on (or loading into) any host replica, refreshed every
    `interval_s` in a background thread from the hosts' published state."""

    def __init__(self, source: Callable[[], list[dict[str, Any]]], interval_s: float = 1.0):
        self._source = source
        self._interval_s = interval_s
        self._keys: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def keys(self) -> frozenset[str]:
        """The resident (or loading) keys as of the last refresh."""
        return self._keys

    def refresh(self) -> None:
        """Read the hosts' state once (blocking)."""
        keys: set[str] = set()
        for replica in self._source():
            keys.update(m["key"] for m in replica.get("models", []))
            keys.update(replica.get("loading", []))
        self._keys = frozenset(keys)

    def start(self) -> None:
        """Refresh in a daemon thread until `stop()`."""

        def run() -> None:
            while True:
                try:
                    self.refresh()
                except Exception:  # NOTE: the view must outlive a bad read; logged
                    logger.exception("residency view refresh failed")
                if self._stop.wait(self._interval_s):
                    return

        self._thread = threading.Thread(target=run, name="fleet-residency", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing."""
        self._stop.set()


class Tenants:
    """Every tenant of the app, their keys and the admin key (see module docstring)."""

    def __init__(
        self,
        config: AuthConfig,
        admin_key_hash: str | None,
        manifests: Manifests,
        is_alias: Callable[[str], bool],
        resident: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        """Plain keys are read here (env vars, files); a missing or short key raises
        ValueError, so a bad config fails the deploy."""
        self.enabled = bool(config.tenants)
        self._manifests = manifests
        self._is_alias = is_alias
        self._resident = resident
        self._ring: KeyRing[Principal] = KeyRing()
        self.by_name: dict[str, Principal] = {}
        for tenant in config.tenants:
            principal = Principal(
                tenant.name, tenant, _bucket(tenant), ColdLoads(tenant.max_cold_loads)
            )
            self.by_name[tenant.name] = principal
            for key_hash in read_hashes(tenant.key_hashes, tenant.key_env, tenant.key_files):
                self._ring.add(key_hash, principal)
        self.admin = Principal(ADMIN)
        if admin_key_hash is not None:
            self._ring.add(admin_key_hash, self.admin)

    @property
    def names(self) -> list[str]:
        """Every principal name a request can be accounted to (bounded: from config)."""
        return [*self.by_name, ADMIN, ANONYMOUS]

    @property
    def caps_cold_loads(self) -> bool:
        """Whether any tenant has a cold-load cap (then residency must be watched)."""
        return any(p.cold.limit is not None for p in self.by_name.values())

    def authenticate(self, key: str | None) -> Principal:
        """The owner of `key`.

        Raises:
            Unauthorized: no key, or not one of ours (401).
        """
        principal = self._ring.find(key)
        if principal is None:
            raise Unauthorized(
                "this endpoint needs 'Authorization: Bearer <key>' with a valid API key"
            )
        return principal

    def authorize(self, principal: Principal, name: str, version: str | None = None) -> None:
        """Check `principal`'s rate and scope for `name`, then make it the current one.

        Raises:
            RateLimited: over the tenant's rate (429, Retry-After).
            OutOfScope: `name` is not in the tenant's scope, or does not exist (403).
        """
        if principal.bucket is not None:
            wait_s = principal.bucket.take()
            if wait_s > 0:
                raise RateLimited(
                    "this key is over its request rate; retry later",
                    retry_after_s=max(1.0, math.ceil(wait_s)),
                )
        if not principal.allows(name, self._is_alias(name), self._manifests, version):
            raise OutOfScope(f"this key may not call model {name[:128]!r}")
        _current.set(principal)

    def for_handle(self, tenant: str | None, name: str, version: str | None = None) -> None:
        """A handle caller (inside Ray's trust boundary) names its tenant, or none (then
        nothing is checked, as with no tenants configured): the same scope, rate and
        cold-load rules as over HTTP.

        Raises:
            OutOfScope: no such tenant, or `name` is outside its scope.
            RateLimited: over its rate.
        """
        if tenant is None or not self.enabled:
            return
        principal = self.by_name.get(tenant)
        if principal is None:
            raise OutOfScope(f"no tenant {tenant[:64]!r} may call model {name[:128]!r}")
        self.authorize(principal, name, version)

    def gate(
        self, dispatch: Callable[[Call], Awaitable[Result]], key_of: Callable[[Call], str]
    ) -> Callable[[Call], Awaitable[Result]]:
        """`dispatch`, with the current principal's cold-load cap applied to each call."""

        async def gated(call: Call) -> Result:
            principal = current()
            if principal is None or principal.cold.limit is None or self._resident is None:
                return await dispatch(call)
            key = key_of(call)
            if key in self._resident():
                return await dispatch(call)
            principal.cold.enter(key)
            try:
                return await dispatch(call)
            finally:
                principal.cold.leave(key)

        return gated

    def visible(self, principal: Principal | None, model_ids: Iterable[str]) -> list[str]:
        """Those of `model_ids` that `principal` may call (all of them for None/admin)."""
        if principal is None or principal.config is None:
            return list(model_ids)
        return [m for m in model_ids if principal.allows(m, False, self._manifests, None)]


def _bucket(tenant: TenantConfig) -> TokenBucket | None:
    if tenant.rate_per_s is None:
        return None
    burst = tenant.burst if tenant.burst is not None else max(1.0, tenant.rate_per_s)
    return TokenBucket(tenant.rate_per_s, float(burst))


def run_as(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Make `principal` current (tests, handle calls); returns the reset token."""
    return _current.set(principal)
