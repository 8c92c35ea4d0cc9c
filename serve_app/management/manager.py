"""Model management: where each model is, and prewarm / unload / pin / unpin across replicas.

`ModelManager` is the control path behind `GET /v1/models/{id}` residency, `GET /v1/replicas`,
`POST /v1/models/{id}/load|unload`, `PUT|DELETE /v1/models/{id}/pin` and the V2 repository
extension. It knows nothing of Ray: it reads live replicas' published state and sends
`HostCommand`s to named replicas through a `HostControl` (in Serve: the replica directory
and a handle whose router delivers each command to the replica it names).

- load: on `replicas` replicas (those already holding it first, then the emptiest);
- unload: unpins and evicts on every live replica (in-flight requests finish first);
- pin: recorded in the `PinStore` first (so replicas that start later apply it too), then
  pinned and loaded on every live replica; if any replica refuses (`PinRefused`, 507) the
  pin is rolled back and the refusal is raised. The rollback removes only what this call
  added: the store record if there was none before, and the pin on the replicas where the
  model was not pinned before (a config pin or an earlier pin stays);
- unpin: removed from the store and released on every live replica (the model stays
  resident until the cache needs the room). Pins have owners: a replica refuses to unpin
  or unload a model the config's routing pins (`PinnedByConfig`, 409 in its outcome).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from serve_app.config import DEFAULT_POOL
from serve_app.errors import FleetError, ModelNotFound, PinRefused, ReplicaUnavailable, unwrap
from serve_app.management.pins import PinRecord, PinStore
from serve_app.schemas import (
    HostCommand,
    HostReply,
    ManagementResult,
    ReplicaOutcome,
    Residency,
)
from serve_app.storage.manifest import Manifest, validate_model_id
from serve_app.storage.registry import Registry


class HostControl(Protocol):
    """How the manager sees and reaches the model-host replicas."""

    def replicas(self) -> list[dict[str, Any]]:
        """Published state of every live replica (blocking; called from a thread)."""
        ...

    async def command(self, command: HostCommand) -> HostReply:
        """Run `command` on the replica it names.

        Raises:
            FleetError: what the replica raised, or ReplicaUnavailable.
        """
        ...


class ModelManager:
    """Residency views and management actions over a pool of model hosts."""

    def __init__(
        self,
        registry: Registry,
        control: HostControl,
        pins: PinStore,
        pool_for: Callable[[Manifest], str] | None = None,
    ) -> None:
        """`pool_for` names the pool a model version is placed in (isolated pools); loads
        and pins go only to that pool's replicas. Without it every replica qualifies."""
        self._pool_for = pool_for
        self.registry = registry
        self.control = control
        self.pins = pins

    # ------------------------------------------------------------------ views
    async def replicas(self) -> list[dict[str, Any]]:
        """Every live model-host replica: budget, resident bytes, models, loads, pins."""
        return await asyncio.to_thread(self.control.replicas)

    async def residency(self, model_id: str) -> list[Residency]:
        """Where any version of `model_id` is resident, by replica."""
        prefix = f"{model_id}@"
        out = []
        for replica in await self.replicas():
            for model in replica.get("models", []):
                if not model["key"].startswith(prefix):
                    continue
                out.append(
                    Residency(
                        replica=replica["replica"],
                        pool=replica.get("pool", "default"),
                        device=replica.get("device", "cpu"),
                        node=replica.get("node"),
                        version=model["key"][len(prefix) :],
                        bytes=model["bytes"],
                        loaded_at=model.get("loaded_at"),
                        last_used=model.get("last_used"),
                        load_s=model.get("load_s"),
                        pinned=bool(model.get("pinned", False)),
                        leases=model.get("leases", 0),
                    )
                )
        return out

    async def repository_index(self) -> list[dict[str, Any]]:
        """The V2 repository index: every published version with its state.

        `READY` when resident on some replica, `LOADING` while a load runs, else
        `UNAVAILABLE` with the reason (such models still load on their first request).
        """
        resident: set[str] = set()
        loading: set[str] = set()
        for replica in await self.replicas():
            resident.update(m["key"] for m in replica.get("models", []))
            loading.update(replica.get("loading", []))
        index = []
        for summary in self.registry.summaries():
            for version in summary.versions:
                key = f"{summary.model_id}@{version}"
                state, reason = "UNAVAILABLE", "not resident; loads on its first request"
                if key in resident:
                    state, reason = "READY", ""
                elif key in loading:
                    state, reason = "LOADING", "loading"
                index.append(
                    {"name": summary.model_id, "version": version, "state": state, "reason": reason}
                )
        return index

    # ------------------------------------------------------------------ actions
    async def load(
        self, model_id: str, version: str | None = None, replicas: int = 1
    ) -> ManagementResult:
        """Make the model resident on `replicas` replicas (those holding it count).

        Raises:
            FleetError: every targeted replica failed (the first replica's error).
        """
        manifest = self.registry.resolve(model_id, version)
        live = await self._live(manifest)
        chosen = sorted(live, key=lambda r: _placement_rank(r, manifest.key))[: max(1, replicas)]
        outcomes = await self._run_on(
            [r["replica"] for r in chosen], "load", manifest.key, manifest
        )
        _raise_if_all_failed(outcomes)
        return _result(manifest.model_id, [manifest.version], "load", outcomes)

    async def unload(self, model_id: str, version: str | None = None) -> ManagementResult:
        """Unpin and evict the model (all versions unless `version`) on every replica."""
        return await self._everywhere("unload", model_id, version)

    async def pin(self, model_id: str, version: str | None = None) -> ManagementResult:
        """Pin the model version on every replica, now and after restarts.

        Raises:
            PinRefused: some replica cannot fit it beside its other pins (507); the pin
                is rolled back everywhere.
            FleetError: every replica failed to load it.
        """
        manifest = self.registry.resolve(model_id, version)
        live = await self._live(manifest)
        pool = self._pool_for(manifest) if self._pool_for is not None else DEFAULT_POOL
        existed = await asyncio.to_thread(self.pins.get, manifest.key) is not None
        if not existed:
            await asyncio.to_thread(self.pins.put, PinRecord(manifest=manifest, pool=pool))
        names = [r["replica"] for r in live]
        outcomes = await self._run_on(names, "pin", manifest.key, manifest)
        refused = next((o.error for o in outcomes if isinstance(o.error, PinRefused)), None)
        if refused is not None or all(o.error is not None for o in outcomes):
            # NOTE: roll back only what this call added (see module docstring).
            if not existed:
                await asyncio.to_thread(self.pins.delete, manifest.key)
            added = [o.report.replica for o in outcomes if o.added]
            await self._run_on(added, "unpin", manifest.key, None)
            if refused is not None:
                raise refused
            _raise_if_all_failed(outcomes)
        return _result(manifest.model_id, [manifest.version], "pin", outcomes)

    async def unpin(self, model_id: str, version: str | None = None) -> ManagementResult:
        """Release the pin (all pinned versions unless `version`) on every replica."""
        return await self._everywhere("unpin", model_id, version)

    async def _everywhere(
        self, op: Literal["unload", "unpin"], model_id: str, version: str | None
    ) -> ManagementResult:
        """Drop the stored pins, then run `op` for each version on every live replica
        (unload also fails when every replica failed; unpin never does)."""
        keys = self._keys(model_id, version)
        for key in keys:
            await asyncio.to_thread(self.pins.delete, key)
        names = [r["replica"] for r in await self._live()]
        outcomes = []
        for key in keys:
            outcomes.extend(await self._run_on(names, op, key, None))
        if op == "unload":
            _raise_if_all_failed(outcomes)
        return _result(model_id, [k.split("@", 1)[1] for k in keys], op, outcomes)

    # ------------------------------------------------------------------ helpers
    def _keys(self, model_id: str, version: str | None) -> list[str]:
        """Keys of the named version, or of every published version."""
        if version is not None:
            return [self.registry.resolve(model_id, version).key]
        validate_model_id(model_id)
        versions = self.registry.versions(model_id)
        if not versions:
            raise ModelNotFound(f"model {model_id!r} is not published")
        return [f"{model_id}@{v}" for v in versions]

    async def _live(self, manifest: Manifest | None = None) -> list[dict[str, Any]]:
        """Live replicas; with `manifest`, only those of the pool it is placed in."""
        live = await self.replicas()
        if manifest is not None and self._pool_for is not None:
            pool = self._pool_for(manifest)
            live = [r for r in live if r.get("pool", DEFAULT_POOL) == pool]
        if not live:
            raise ReplicaUnavailable("no live model-host replica", retry_after_s=2.0)
        return live

    async def _run_on(
        self, replicas: list[str], op: str, key: str, manifest: Manifest | None
    ) -> list[_Outcome]:
        results = await asyncio.gather(
            *(
                self.control.command(HostCommand(op=op, replica=r, key=key, manifest=manifest))
                for r in replicas
            ),
            return_exceptions=True,
        )
        outcomes = []
        for replica, result in zip(replicas, results, strict=True):
            if isinstance(result, HostReply):
                report = ReplicaOutcome(
                    ok=True, **result.model_dump(exclude={"key", "pinned_before"})
                )
                added = op == "pin" and result.pinned and not result.pinned_before
                outcomes.append(_Outcome(report, None, added))
                continue
            error = unwrap(result)
            if not isinstance(error, FleetError):
                raise error
            report = ReplicaOutcome(replica=replica, ok=False, error=error.message, code=error.code)
            outcomes.append(_Outcome(report, error))
        return outcomes


def _placement_rank(replica: dict[str, Any], key: str) -> tuple[int, int]:
    """Replicas holding `key` first, then the one with the most free bytes."""
    holds = any(m["key"] == key for m in replica.get("models", []))
    free = replica.get("budget_bytes", 0) - replica.get("resident_bytes", 0)
    return (0 if holds else 1, -free)


@dataclass(frozen=True)
class _Outcome:
    report: ReplicaOutcome
    error: FleetError | None
    added: bool = False  # a pin this command added (what a rollback may remove)


def _raise_if_all_failed(outcomes: list[_Outcome]) -> None:
    """Raise the first replica's typed error when no replica succeeded."""
    if outcomes and all(o.error is not None for o in outcomes):
        raise outcomes[0].error  # type: ignore[misc]


def _result(
    model_id: str, versions: list[str], action: str, outcomes: list[_Outcome]
) -> ManagementResult:
    return ManagementResult(
        model_id=model_id, versions=versions, action=action, replicas=[o.report for o in outcomes]
    )
