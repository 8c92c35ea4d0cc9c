"""Request router for model-host pools: Serve's default, plus immediate model affinity.

Ray's router learns which replica holds which model only from the controller's broadcast of
each replica's report, so a request sent right after a load can land on another replica and
load the model a second time. `ModelAffinityRouter` also records, the moment a request for
model K is accepted by replica R, that R holds (or is loading) K. The mark survives
broadcasts until R's own report includes K (confirmed) or `PENDING_S` passes; after that
the replicas' reports alone decide, so an eviction still stops traffic.

A request for a model that no replica holds or is loading (cold) does not go through Ray's
multiplexed matching, which keeps retrying the fewest-models replicas until its matching
timeout (1-2 s) when they reject the request (full), and places by model count, not memory.
The router ranks every replica at once by free memory budget (budget - resident - reserved,
as the hosts publish it in the replica directory, refreshed off the request path), then by
fewest models, and sends the request to the first that accepts it: that replica loads it.

Management commands (`HostCommand`, first argument of `ModelHost.manage`) name the replica
that must run them; the router offers only that replica. (Serve may still, rarely, hand the
chosen replica to another pending request; the host then refuses a command that is not its
own with `CommandMisrouted` and the ingress resends it.)
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RunningReplica

from deployments.replica_directory import read_replicas
from serve_app.schemas import HostCommand

logger = logging.getLogger(__name__)

PENDING_S = 2.0  # longer than a controller round trip, short against any eviction cycle
BUDGET_REFRESH_S = 1.0


class BudgetView:
    """Free bytes per host replica, read from the replica directory by a daemon thread."""

    def __init__(self, app: str, every_s: float = BUDGET_REFRESH_S) -> None:
        self._app = app
        self._every_s = every_s
        self.free: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="budget-view", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.free = {r["replica"]: free_bytes(r) for r in read_replicas(self._app, "hosts")}
            except Exception as exc:  # noqa: BLE001 - a GCS hiccup must not end the loop
                # NOTE: the last view stays; ranking falls back to model counts.
                logger.debug("replica directory read failed", extra={"error": repr(exc)})
            time.sleep(self._every_s)


def free_bytes(status: dict[str, Any]) -> int:
    """Budget not used by resident or reserved (loading) models, from a host's status."""
    return int(
        status.get("budget_bytes", 0)
        - status.get("resident_bytes", 0)
        - status.get("reserved_bytes", 0)
    )


class ModelAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Power-of-two-choices with multiplexing, plus marks for just-routed models,
    immediate placement of cold models by free budget, and replica-addressed management
    commands."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = _command_target(pending_request)
        if target is not None:
            # NOTE: an empty answer makes Serve back off and retry; the sender's timeout
            # bounds the wait when the replica is gone.
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        model_key = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if (
            pending_request is None
            or not model_key
            or self._multiplexed_model_id_to_replica_ids.get(model_key)
        ):
            return await super().choose_replicas(candidate_replicas, pending_request)
        # NOTE: cold: no replica holds or loads it; waiting for a holder cannot help.
        ranked = self.rank_for_load(candidate_replicas)
        pending_request.routing_context.should_backoff = True  # if every replica is full
        return [ranked[:1], ranked[1:]] if len(ranked) > 1 else [ranked]

    def rank_for_load(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """Where to load a model: most free budget first, then fewest models."""
        free = self._budget_view().free
        return sorted(
            replicas,
            key=lambda r: (
                -free.get(r.replica_id.unique_id, 0),
                len(r.multiplexed_model_ids),
                random.random(),
            ),
        )

    def _budget_view(self) -> BudgetView:
        if not hasattr(self, "_budgets"):
            self._budgets = BudgetView(self._deployment_id.app_name)
        return self._budgets

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
