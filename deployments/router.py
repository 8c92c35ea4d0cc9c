"""Request router for model-host pools: Serve's default, plus immediate model affinity.

Ray's router learns which replica holds which model only from the controller's broadcast of
each replica's report, so a request sent right after a load can land on another replica and
load the model a second time. `ModelAffinityRouter` also records, the moment a request for
model K is accepted by replica R, that R holds (or is loading) K. The next broadcast, built
from what replicas really hold, replaces these marks, so an eviction still stops traffic.
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult


class ModelAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Power-of-two-choices with multiplexing, plus marks for just-routed models."""

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        model_key = pending_request.metadata.multiplexed_model_id
        if model_key:
            self._multiplexed_model_id_to_replica_ids[model_key].add(replica_id)
            self._multiplexed_model_id_fallback_match.discard(model_key)
