"""Request router for model-host pools: Serve's default, plus immediate model affinity.

Built on Serve's public request-router API only (`ray.serve.request_router`: `RequestRouter`
with `FIFOMixin`, `LocalityMixin`, `MultiplexMixin`; `RunningReplica.multiplexed_model_ids`
and `.routing_stats`; the `on_request_routed` and `update_replicas` hooks).

A request for model K goes, by power of two choices, to one of the replicas that hold K;
when those are all busy it follows Serve's multiplex ladder (`apply_multiplex_routing`:
replicas with the fewest models, then every replica).

Ray's router learns which replica holds which model only from the controller's broadcast of
each replica's report, so a request sent right after a load can land on another replica and
load the model a second time. `ModelAffinityRouter` also records, the moment a request for
model K is accepted by replica R, that R holds (or is loading) K; for a cold model it does
so already when it picks R, so concurrent requests for K follow the first one. The mark
counts as holding until R's own report includes K (confirmed) or `PENDING_S` passes; after
that the replicas' reports alone decide, so an eviction still stops traffic.

A request for a model that no replica holds or is loading (cold) does not go through Ray's
multiplexed matching, which keeps retrying the fewest-models replicas until its matching
timeout (1-2 s) when they reject the request (full), and places by model count, not memory.
The router ranks every replica at once (`serve_app.gateway.replica_ranking`, shared with
the capacity planner) by free memory budget (budget - resident - reserved,
as each host returns it from `record_routing_stats`, which Serve's controller polls and
broadcasts), then by fewest models, and sends the request to the first that accepts it:
that replica loads it. Until every replica has reported stats once, fewest models decides.

Hot models (`host.hot_copies`, `serve_app.gateway.hot_copies`): the router counts the
requests it routes per model; while a warm model wants more copies than it has holders, one
request goes to the best-placed replica that does not hold it (ranked as a cold load); that
replica is then marked a holder, so one request makes one copy. Until the replica reports
the model among its routing stats' `copy_keys` (or `COPY_PENDING_S` passes), every request
for the model names it (`PredictBatch.copy_on`), and it marks its copy when it serves one:
with `FIFOMixin` Serve may give the chosen replica to another pending request for the same
model, so flagging only the request that made the choice could leave the copy unmarked.
Once the model cools, its traffic goes only to holders that do not report it as a copy,
and the idle copies are dropped by their hosts.

Grouping by replica (`host.batching.group_by_replica`, `serve_app.gateway.replica_batches`):
the router keeps, per warm model that exactly one replica reports and that wants no extra
copy, that replica (`hop_target`, read by the ingress in the same process through
`deployments.router_registry`). The ingress queues such requests per replica and sends
what waits as one `ReplicaBatch` naming it; the router offers only that replica (backing
off while it is busy), or, once it is gone, routes the call by its first model like any
other.

Management commands (`HostCommand`, first argument of `ModelHost.manage`) name the replica
that must run them; the router offers only that replica. (With `FIFOMixin`, Serve may still,
rarely, hand the chosen replica to another pending request; the host then refuses a command
that is not its own with `CommandMisrouted` and the ingress resends it.)
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from deployments import router_registry
from serve_app.gateway.hot_copies import HotCopiesConfig, HotModels, serving_holders
from serve_app.gateway.replica_ranking import rank_for_load
from serve_app.schemas import HostCommand, PredictBatch, ReplicaBatch

PENDING_S = 2.0  # longer than a controller round trip, short against any eviction cycle
MARKING_OPS = frozenset({"load", "pin"})  # management commands that make a replica load K
COPY_PENDING_S = 10.0  # longest a copy is flagged on requests before its host reports it


class AffinityMarks:
    """Replicas that accepted a request for a model, counted as holding it until their own
    report includes it (confirmed), `pending_s` passes, or they leave the replica set."""

    def __init__(
        self, pending_s: float = PENDING_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._pending_s = pending_s
        self._clock = clock
        self._marks: dict[str, dict[ReplicaID, float]] = {}

    def mark(self, model_key: str, replica_id: ReplicaID) -> None:
        """`replica_id` just accepted a request that makes it hold `model_key`."""
        self._marks.setdefault(model_key, {})[replica_id] = self._clock()

    def unmark(self, model_key: str, replica_id: ReplicaID) -> None:
        """`replica_id` was told to drop `model_key`."""
        marks = self._marks.get(model_key)
        if marks is not None:
            marks.pop(replica_id, None)
            if not marks:
                del self._marks[model_key]

    def keep_only(self, model_key: str, replica_id: ReplicaID) -> None:
        """`replica_id` took `model_key` although the mark pointed elsewhere (the claimed
        replica was full or did not answer its queue probe): marks on other replicas go,
        so the next requests follow the replica that is actually loading it."""
        marks = self._marks.get(model_key)
        if marks is not None:
            self._marks[model_key] = {replica_id: marks.get(replica_id, self._clock())}

    def marked(
        self, model_key: str, replicas: Mapping[ReplicaID, RunningReplica]
    ) -> set[ReplicaID]:
        """Replicas whose mark for `model_key` still stands; drops the others."""
        marks = self._marks.get(model_key)
        if not marks:
            return set()
        now = self._clock()
        live = set()
        for replica_id, marked_at in list(marks.items()):
            replica = replicas.get(replica_id)
            if (
                replica is None  # gone
                or model_key in replica.multiplexed_model_ids  # confirmed by its report
                or now - marked_at > self._pending_s  # expired: the reports decide
            ):
                del marks[replica_id]
            else:
                live.add(replica_id)
        if not marks:
            del self._marks[model_key]
        return live

    def prune(self, replicas: Mapping[ReplicaID, RunningReplica]) -> None:
        """Drop every mark that no longer stands (on each replica-set broadcast)."""
        for model_key in list(self._marks):
            self.marked(model_key, replicas)

    def __len__(self) -> int:
        return sum(len(m) for m in self._marks.values())


class ModelAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Power-of-two choices among a model's holders (reported or just marked), immediate
    placement of cold models by free budget, and replica-addressed management commands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marks = AffinityMarks()
        self.hot = HotModels()
        self._copying: dict[str, tuple[str, float]] = {}  # model -> (replica, since)
        # NOTE: read from the ingress's thread: only single-key reads and writes, and a
        # rebuild swaps in a new dict.
        self._hop_targets: dict[str, str] = {}
        deployment_id = kwargs.get("deployment_id")
        if deployment_id is not None:
            router_registry.register(deployment_id.app_name, deployment_id.name, self)

    def initialize_state(self, hot_copies: dict[str, Any] | None = None, **_: Any) -> None:
        """Serve's hook for `RequestRouterConfig.request_router_kwargs` (`deployments/
        builder.py` passes the pool's `hot_copies`)."""
        self.hot = HotModels(HotCopiesConfig.model_validate(hot_copies or {}))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [self._two(self.apply_locality_routing(None))]
        context = pending_request.routing_context
        target = command_target(pending_request)
        if target is not None:
            # NOTE: an empty answer makes Serve back off and retry; the sender's timeout
            # bounds the wait when the replica is gone.
            context.should_backoff = True
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        group = _replica_batch(pending_request)
        if group is not None:
            target = [r for r in candidate_replicas if r.replica_id.unique_id == group.replica]
            if target:
                context.should_backoff = True  # wait for it while it is busy
                return [target]
            # NOTE: the replica is gone: route by the first model like any request.
        model_key = pending_request.metadata.multiplexed_model_id
        if not model_key:
            return [self._two(self.apply_locality_routing(pending_request))]
        holders = self.holders(model_key)
        if not holders:
            # NOTE: cold: no replica holds or loads it; waiting for a holder cannot help.
            context.should_backoff = True  # if every replica is full
            ranked = rank_for_load(candidate_replicas, model_key)
            if ranked:
                # NOTE: claimed now, not when the replica accepts: requests for the same
                # cold model routed meanwhile follow this one, even when a stats broadcast
                # in between reorders the ranking (two loads of one model on two nodes).
                self.marks.mark(model_key, ranked[0].replica_id)
            return [ranked[:1], ranked[1:]]
        if not self._reported(model_key):
            # NOTE: only marked: the model is loading there. Serve's ladder would fall
            # through to replicas without it whenever the holder is slow to answer its
            # queue probe (a loaded box, a load holding the GIL), loading the model a
            # second time; instead back off and retry the holder. Its mark lapses after
            # PENDING_S if it never reports the model, and the model is cold again.
            context.should_backoff = True
            return [self._two(holders)]
        first_try = not context.tried_first_multiplexed_models
        wanted = self.hot.wanted(model_key)
        copy_to = None
        if first_try and len(holders) < wanted and self._copy_in_progress(model_key) is None:
            copy_to = self._copy_target(model_key, candidate_replicas, holders)
        _flag_copy(pending_request, self._copy_in_progress(model_key))
        if copy_to is not None:
            return [[copy_to], self._two(holders)]
        # NOTE: Serve's ladder keeps its own state in the routing context; on the first try
        # its first rung (reported holders) is replaced by ours (reported + marked).
        ladder = self.apply_multiplex_routing(pending_request)
        if not first_try:
            return [self._two(ladder)]
        return [self._two(serving_holders(holders, self._copy_holders(model_key), wanted))]

    def _copy_target(
        self, model_key: str, candidates: list[RunningReplica], holders: set[ReplicaID]
    ) -> RunningReplica | None:
        """Where an extra copy of a hot model goes (placed like a cold load); None if every
        replica holds it. Requests name it until it reports the copy."""
        others = [r for r in candidates if r.replica_id not in holders]
        if not others:
            return None
        target = rank_for_load(others, model_key)[0]
        self._copying[model_key] = (target.replica_id.unique_id, time.monotonic())
        return target

    def _copy_in_progress(self, model_key: str) -> str | None:
        """The replica making an extra copy of `model_key`, until it reports it (or gives
        up: gone, or `COPY_PENDING_S` passed)."""
        copying = self._copying.get(model_key)
        if copying is None:
            return None
        unique_id, since = copying
        replica = next(
            (r for r in self.curr_replicas.values() if r.replica_id.unique_id == unique_id), None
        )
        if (
            replica is None
            or model_key in (replica.routing_stats or {}).get("copy_keys", ())
            or time.monotonic() - since > COPY_PENDING_S
        ):
            del self._copying[model_key]
            return None
        return unique_id

    def _copy_holders(self, model_key: str) -> set[ReplicaID]:
        """Replicas whose routing stats report `model_key` as an extra copy."""
        return {
            rid
            for rid, r in self.curr_replicas.items()
            if model_key in (r.routing_stats or {}).get("copy_keys", ())
        }

    def hop_target(self, model_key: str) -> str | None:
        """The replica (unique id) the ingress may group `model_key`'s requests on: the one
        replica that reports it, while it wants no extra copy; else None."""
        return self._hop_targets.get(model_key)

    def forget_hop_target(self, model_key: str) -> None:
        """Its replica no longer holds `model_key` (it said so): stop grouping it there
        until the replicas' reports say otherwise."""
        self._hop_targets.pop(model_key, None)

    def _rebuild_hop_targets(self) -> None:
        reports = Counter(
            key for r in self.curr_replicas.values() for key in r.multiplexed_model_ids
        )
        self._hop_targets = {
            key: rid.unique_id
            for rid, r in self.curr_replicas.items()
            for key in r.multiplexed_model_ids
            if reports[key] == 1
            and self.hot.wanted(key) <= 1
            and not self.marks.marked(key, self.curr_replicas) - {rid}
        }

    def holders(self, model_key: str) -> set[ReplicaID]:
        """Replicas that report `model_key`, or accepted a request for it moments ago."""
        return self._reported(model_key) | self.marks.marked(model_key, self.curr_replicas)

    def _reported(self, model_key: str) -> set[ReplicaID]:
        """Replicas whose last report to Serve's controller lists `model_key`."""
        replicas = self.curr_replicas
        return {rid for rid, r in replicas.items() if model_key in r.multiplexed_model_ids}

    def _two(self, replica_ids: Iterable[ReplicaID]) -> list[RunningReplica]:
        replicas = self.curr_replicas
        pool = [replicas[rid] for rid in replica_ids if rid in replicas]
        return random.sample(pool, min(2, len(pool)))

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: object
    ) -> None:
        super().on_request_routed(pending_request, replica_id, result)  # type: ignore[arg-type]
        group = _replica_batch(pending_request)
        if group is not None:
            for batch in group.batches:
                self._routed(batch.manifest.key, replica_id, len(batch.request_ids))
            return
        model_key = pending_request.metadata.multiplexed_model_id
        if model_key:
            batch = pending_request.args[0] if pending_request.args else None
            # NOTE: the ingress batches concurrent requests for a model: count requests.
            count = len(batch.request_ids) if isinstance(batch, PredictBatch) else 1
            self._routed(model_key, replica_id, count)
            return
        command = _command(pending_request)
        if command is not None and command.op in MARKING_OPS:
            self.marks.mark(command.key, replica_id)
        elif command is not None and command.op == "unload":
            self.marks.unmark(command.key, replica_id)

    def _routed(self, model_key: str, replica_id: ReplicaID, requests: int) -> None:
        self.hot.record(model_key, requests)
        replica = self.curr_replicas.get(replica_id)
        if replica is None or model_key not in replica.multiplexed_model_ids:
            # NOTE: a cold claim on another replica that fell through to this one
            # (full, or its queue probe timed out) must not draw later requests there:
            # that replica would load the model a second time.
            self.marks.mark(model_key, replica_id)  # (a hit needs no mark)
            self.marks.keep_only(model_key, replica_id)
            self._hop_targets.pop(model_key, None)
        elif self.hot.wanted(model_key) > 1:
            self._hop_targets.pop(model_key, None)  # hot: per-model calls make copies

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.marks.prune(self.curr_replicas)
        self._rebuild_hop_targets()


def _flag_copy(pending_request: PendingRequest, replica: str | None) -> None:
    """Name on this request the replica making a copy of its model (None: no copy)."""
    batch = pending_request.args[0] if pending_request.args else None
    if isinstance(batch, PredictBatch) and batch.copy_on != replica:
        pending_request.args[0] = dataclasses.replace(batch, copy_on=replica)


def _replica_batch(pending_request: PendingRequest) -> ReplicaBatch | None:
    args = pending_request.args
    return args[0] if args and isinstance(args[0], ReplicaBatch) else None


def _command(pending_request: PendingRequest) -> HostCommand | None:
    args = pending_request.args
    return args[0] if args and isinstance(args[0], HostCommand) else None


def command_target(pending_request: PendingRequest) -> str | None:
    """The replica (unique id) a management command names, or None for other requests."""
    command = _command(pending_request)
    return command.replica if command is not None else None
