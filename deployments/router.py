"""Request router for model-host pools: Serve's default, plus immediate model affinity.

Ray's router learns which replica holds which model only from the controller's broadcast of
each replica's report, so a request sent right after a load can land on another replica and
load the model a second time. `ModelAffinityRouter` also records, the moment a request for
model K is accepted by replica R, that R holds (or is loading) K. The mark survives
broadcasts until R's own report includes K (confirmed) or `PENDING_S` passes; after that
the replicas' reports alone decide, so an eviction still stops traffic.

Management commands (`HostCommand`, first argument of `ModelHost.manage`) name the replica
that must run them; the router offers only that replica. (Serve may still, rarely, hand the
chosen replica to another pending request; the host then refuses a command that is not its
own with `CommandMisrouted` and the ingress resends it.)
"""

from __future__ import annotations

import time

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RunningReplica

from serve_app.schemas import HostCommand

PENDING_S = 2.0  # longer than a controller round trip, short against any eviction cycle


class ModelAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Power-of-two-choices with multiplexing, plus marks for just-routed models, plus
    replica-addressed management commands."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = _command_target(pending_request)
        if target is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        # NOTE: an empty answer makes Serve back off and retry; the sender's timeout bounds
        # the wait when the replica is gone.
        return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        model_key = pending_request.metadata.multiplexed_model_id
        if model_key:
            self._marks()[(model_key, replica_id)] = time.monotonic()
            self._multiplexed_model_id_to_replica_ids[model_key].add(replica_id)
            self._multiplexed_model_id_fallback_match.discard(model_key)

    def _update_multiplexed_model_ids_with_replicas(self, replicas: list[RunningReplica]) -> None:
        super()._update_multiplexed_model_ids_with_replicas(replicas)
        reported = {r.replica_id: r.multiplexed_model_ids for r in replicas}
        now = time.monotonic()
        marks = self._marks()
        for (model_key, replica_id), marked_at in list(marks.items()):
            held = reported.get(replica_id)
            if held is None or model_key in held or now - marked_at > PENDING_S:
                del marks[(model_key, replica_id)]  # gone, confirmed, or expired
            else:
                # NOTE: a broadcast built before the replica reported this model.
                self._multiplexed_model_id_to_replica_ids[model_key].add(replica_id)

    def _marks(self) -> dict[tuple[str, ReplicaID], float]:
        # NOTE: created lazily: Ray builds routers through its own initialisation hooks.
        if not hasattr(self, "_affinity_marks"):
            self._affinity_marks: dict[tuple[str, ReplicaID], float] = {}
        return self._affinity_marks


def _command_target(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return first.replica if isinstance(first, HostCommand) else None
