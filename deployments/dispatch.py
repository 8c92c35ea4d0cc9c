"""How the ingress sends a validated call to its host pool: batched per model, or grouped
per replica (`HostDispatch`).

- Per model: concurrent requests for one model travel to the pool together, one handle call
  per batch (the host batches again across ingress replicas); up to `max(2, the pool's
  replicas)` batches of a model are in flight so every holder stays busy. With
  `max_batch_size: 1` every request is its own call.
- Per replica (`batching.group_by_replica`, `serve_app.gateway.replica_batches`): a warm
  request whose model one replica alone holds (the pool's router says which, through
  `deployments.router_registry`) queues under that replica, and what waits travels as one
  `ReplicaBatch` naming it, one grouped call in flight per replica. A model the replica has
  evicted since it last reported it comes back `NotResidentHere`; its requests then take
  the per-model path, which loads it, outside the replica's group queue.

Batching settings are each pool's own.
"""

from __future__ import annotations

from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.router_registry import router_for
from serve_app.config import BatchingConfig, PoolConfig
from serve_app.errors import NotResidentHere
from serve_app.gateway import replica_batches
from serve_app.host.batching import BatchPolicy, MicroBatcher
from serve_app.schemas import BatchResult, PredictBatch, PredictCall, PredictResponse

Outcome = PredictResponse | BaseException
GROUP_IN_FLIGHT = 1  # grouped calls per host replica: what arrives meanwhile leaves next


class HostDispatch:
    """`dispatch(call)`: the gateway's way to the host pools (see module docstring)."""

    def __init__(
        self, pools: dict[str, DeploymentHandle], pool_configs: list[PoolConfig], app: str
    ) -> None:
        self._pools = pools
        self._pool_by_name = {p.name: p for p in pool_configs}
        self._app = app
        self._batcher: MicroBatcher[tuple[str, str], PredictCall, Outcome] = MicroBatcher(
            self._send_batch, self._batch_policy
        )
        self._groups: MicroBatcher[tuple[str, str], PredictCall, Outcome] = MicroBatcher(
            self._send_group, self._group_policy
        )

    async def dispatch(self, call: PredictCall) -> PredictResponse:
        """The host's response to `call`; raises its typed error."""
        key = (call.pool, call.manifest.key)
        batching = self._batching(call.pool)
        policy = batching.for_model(call.manifest.model_id)
        rows = len(call.inputs)
        if policy.max_batch_size <= 1:
            (outcome,) = await self._send_batch(key, [call])
        elif (
            batching.group_by_replica
            and policy.max_wait_ms <= 0
            and (replica := self._hop_target(call.pool, call.manifest.key))
        ):
            outcome = await self._groups.submit((call.pool, replica), call, rows=rows)
            if isinstance(outcome, NotResidentHere):
                self._forget_hop_target(call.pool, call.manifest.key)
                outcome = await self._batcher.submit(key, call, rows=rows)
        else:
            outcome = await self._batcher.submit(key, call, rows=rows)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _batching(self, pool: str) -> BatchingConfig:
        config = self._pool_by_name.get(pool)
        return config.batching if config is not None else BatchingConfig()

    def _batch_policy(self, key: tuple[str, str]) -> BatchPolicy:
        pool, model_key = key
        config = self._batching(pool).for_model(model_key.split("@", 1)[0])
        replicas = getattr(self._pool_by_name.get(pool), "num_replicas", 1)
        return BatchPolicy(config.max_batch_size, config.max_wait_ms, max(2, replicas))

    def _group_policy(self, key: tuple[str, str]) -> BatchPolicy:
        per_model = self._batching(key[0]).max_batch_size
        return BatchPolicy(8 * per_model, 0.0, GROUP_IN_FLIGHT)

    def _router(self, pool: str) -> Any:
        """This process's router of `pool` (None before its first request)."""
        config = self._pool_by_name.get(pool)
        return None if config is None else router_for(self._app, config.deployment_name)

    def _hop_target(self, pool: str, model_key: str) -> str | None:
        """The host replica that alone holds `model_key` (warm, no extra copy wanted)."""
        router = self._router(pool)
        return None if router is None else router.hop_target(model_key)

    def _forget_hop_target(self, pool: str, model_key: str) -> None:
        router = self._router(pool)
        if router is not None:
            router.forget_hop_target(model_key)

    async def _send_group(self, key: tuple[str, str], calls: list[PredictCall]) -> list[Outcome]:
        pool, replica = key
        group, places = replica_batches.group(calls, replica)
        handle = self._pools[pool].options(multiplexed_model_id=group.model_key)
        results = await handle.predict_many.remote(group)
        return replica_batches.outcomes(group, places, results)

    async def _send_batch(self, key: tuple[str, str], calls: list[PredictCall]) -> list[Outcome]:
        pool, model_key = key
        manifest = calls[0].manifest
        batch = PredictBatch(manifest, [c.inputs for c in calls], [c.request_id for c in calls])
        handle = self._pools[pool].options(multiplexed_model_id=model_key)
        result: BatchResult = await handle.predict_batch.remote(batch)
        return [result.outcome(manifest, i) for i in range(len(calls))]
