"""The model-affinity router, run for real without Ray: where it loads a cold model (most
free budget first, from the hosts' routing stats, then fewest models), how long a
just-routed request marks its replica as holding the model, and management commands going
only to the replica they name. Replicas are light fakes with the `RunningReplica` fields the
router reads."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve.request_router import PendingRequest, ReplicaID

from deployments.router import PENDING_S, AffinityMarks, ModelAffinityRouter
from serve_app.gateway.replica_ranking import free_bytes, rank_for_load
from serve_app.schemas import HostCommand

DEPLOYMENT = DeploymentID(name="ModelHost", app_name="fleet")
MB = 2**20


def rid(name: str) -> ReplicaID:
    return ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)


async def _no_queue(deadline_s: float) -> int:
    return 0


def replica(
    name: str, models: int | set[str] = 0, stats: dict[str, int] | None = None
) -> SimpleNamespace:
    held = models if isinstance(models, set) else {f"m{i}@1" for i in range(models)}
    return SimpleNamespace(
        replica_id=rid(name),
        multiplexed_model_ids=held,
        routing_stats=stats if stats is not None else {},
        max_ongoing_requests=8,
        node_id="node",
        availability_zone=None,
        get_queue_len=_no_queue,
    )


def budget(free_mb: int, total_mb: int = 1000) -> dict[str, int]:
    return {"budget_bytes": total_mb * MB, "resident_bytes": (total_mb - free_mb) * MB}


def names(replicas: list[Any]) -> list[str]:
    return [r.replica_id.unique_id for r in replicas]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------ cold placement


def test_most_free_budget_first_even_with_more_models() -> None:
    replicas = [
        replica("a", 1, budget(10)),
        replica("b", 5, budget(500)),
        replica("c", 0, budget(200)),
    ]
    assert names(rank_for_load(replicas)) == ["b", "c", "a"]


def test_before_every_replica_reported_stats_fewest_models_first() -> None:
    replicas = [replica("a", 3), replica("b", 1), replica("c", 2)]
    assert names(rank_for_load(replicas)) == ["b", "c", "a"]
    # one replica (a new one) has not reported yet: budgets are not comparable
    replicas = [replica("a", 3, budget(900)), replica("b", 1), replica("c", 2, budget(10))]
    assert names(rank_for_load(replicas)) == ["b", "c", "a"]


def test_ties_break_the_same_way_for_one_model() -> None:
    replicas = [replica(n, 0, budget(100)) for n in "abcdefgh"]
    firsts = {names(rank_for_load(replicas, "m@1"))[0] for _ in range(5)}
    assert len(firsts) == 1  # concurrent requests for one cold model agree
    spread = {names(rank_for_load(replicas, f"m{i}@1"))[0] for i in range(40)}
    assert len(spread) > 1  # different models do not all pile on one replica


def test_free_bytes_counts_resident_and_reserved() -> None:
    assert free_bytes({"budget_bytes": 100, "resident_bytes": 30, "reserved_bytes": 25}) == 45
    assert free_bytes({}) is None


# ------------------------------------------------------------------------------- marks


def test_a_mark_stands_until_confirmed_expired_or_gone() -> None:
    clock = Clock()
    marks = AffinityMarks(clock=clock)
    a, b = replica("a"), replica("b")
    current = {a.replica_id: a, b.replica_id: b}
    marks.mark("k@1", a.replica_id)
    marks.mark("k@1", b.replica_id)
    assert marks.marked("k@1", current) == {a.replica_id, b.replica_id}
    a.multiplexed_model_ids = {"k@1"}  # a's own report now says so: its mark is done
    assert marks.marked("k@1", current) == {b.replica_id}
    clock.now += PENDING_S + 0.1  # b never reported it: the reports decide again
    assert marks.marked("k@1", current) == set()
    marks.mark("k@1", b.replica_id)
    assert marks.marked("k@1", {a.replica_id: a}) == set()  # b left the replica set
    assert len(marks) == 0


def test_unload_command_drops_the_mark() -> None:
    marks = AffinityMarks()
    a = replica("a")
    marks.mark("k@1", a.replica_id)
    marks.unmark("k@1", a.replica_id)
    assert marks.marked("k@1", {a.replica_id: a}) == set()


# ------------------------------------------------------------------------ the router


def make_router(*replicas: SimpleNamespace, clock: Clock | None = None) -> ModelAffinityRouter:
    router = ModelAffinityRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.UNKNOWN,
        self_node_id="node",
    )
    if clock is not None:
        router.marks = AffinityMarks(clock=clock)
    router.update_replicas(list(replicas))
    return router


def request(model_key: str = "", *args: Any) -> PendingRequest:
    metadata = SimpleNamespace(multiplexed_model_id=model_key, internal_request_id="r")
    return PendingRequest(args=list(args), kwargs={}, metadata=metadata)  # type: ignore[arg-type]


async def choose(router: ModelAffinityRouter, pending: PendingRequest) -> list[list[str]]:
    ranks = await router.choose_replicas(list(router.curr_replicas.values()), pending)
    return [names(rank) for rank in ranks]


async def test_requests_go_to_the_replica_that_holds_the_model() -> None:
    router = make_router(replica("a", {"k@1"}), replica("b", 0), replica("c", 0))
    for _ in range(5):
        assert await choose(router, request("k@1")) == [["a"]]
    router.on_request_routed(request("k@1"), rid("a"), object())
    assert len(router.marks) == 0  # a hit needs no mark


async def test_a_just_routed_model_draws_its_next_requests_before_any_report() -> None:
    clock = Clock()
    a, b = replica("a", 2, budget(100)), replica("b", 0, budget(900))
    router = make_router(a, b, clock=clock)
    first = request("k@1")
    assert await choose(router, first) == [["b"], ["a"]]  # cold: most free budget
    router.on_request_routed(first, b.replica_id, object())
    assert await choose(router, request("k@1")) == [["b"]]
    router.update_replicas([a, b])  # a broadcast built before b reported k@1
    assert await choose(router, request("k@1")) == [["b"]]
    b.multiplexed_model_ids = {"k@1"}  # b reports it: the report carries it from here
    router.update_replicas([a, b])
    assert len(router.marks) == 0
    b.multiplexed_model_ids = set()  # b evicted it: it stops drawing traffic
    router.update_replicas([a, b])
    assert await choose(router, request("k@1")) == [["b"], ["a"]]  # cold again, by budget


async def test_concurrent_requests_for_a_cold_model_follow_the_first_choice() -> None:
    a, b = replica("a", 0, budget(900)), replica("b", 0, budget(100))
    router = make_router(a, b)
    first, second = request("k@1"), request("k@1")
    assert await choose(router, first) == [["a"], ["b"]]
    # a stats broadcast before `first` is accepted: a reserved room for other loads
    a.routing_stats, b.routing_stats = budget(50), budget(900)
    router.update_replicas([a, b])
    assert await choose(router, second) == [["a"]]  # not b: one load of k@1, on a
    assert await choose(router, request("j@1")) == [["b"], ["a"]]  # other models: ranked


async def test_a_cold_claim_that_falls_through_follows_the_replica_that_took_it() -> None:
    """The claimed replica was full (or missed its queue probe), so Serve placed the request
    on the next rank: later requests go where the model is loading, not to the claim."""
    a, b = replica("a", 0, budget(900)), replica("b", 0, budget(100))
    router = make_router(a, b)
    first = request("k@1")
    assert await choose(router, first) == [["a"], ["b"]]  # claimed for a
    router.on_request_routed(first, b.replica_id, object())  # ... but b took it
    for _ in range(5):
        assert await choose(router, request("k@1")) == [["b"]]  # never a second load on a


async def test_a_loading_holder_is_retried_not_passed_over() -> None:
    """While a model is only marked (loading, not yet reported), later tries of a request
    stay on its holder, with back-off: Serve's ladder would otherwise fall through to a
    replica without it when the holder misses its queue probe, a second load."""
    a, b = replica("a", 0, budget(900)), replica("b", 0, budget(100))
    router = make_router(a, b)
    first = request("k@1")
    assert await choose(router, first) == [["a"], ["b"]]  # cold: claimed for a
    second = request("k@1")
    for _ in range(4):  # first try, then retries after a missed queue probe
        assert await choose(router, second) == [["a"]]
        assert second.routing_context.should_backoff


async def test_an_unconfirmed_mark_expires() -> None:
    clock = Clock()
    a, b = replica("a", 0, budget(900)), replica("b", 0, budget(100))
    router = make_router(a, b, clock=clock)
    router.on_request_routed(request("k@1"), b.replica_id, object())
    assert await choose(router, request("k@1")) == [["b"]]
    clock.now += PENDING_S + 0.1
    assert await choose(router, request("k@1")) == [["a"], ["b"]]


async def test_busy_holders_then_serves_multiplex_ladder() -> None:
    router = make_router(replica("a", {"k@1", "x@1"}), replica("b", 3), replica("c", 0))
    pending = request("k@1")
    assert await choose(router, pending) == [["a"]]
    # a rejected it (full): Serve's ladder goes on to the replicas with the fewest models
    assert await choose(router, pending) == [["c"]]
    assert pending.routing_context.should_backoff


async def test_commands_go_only_to_the_replica_they_name() -> None:
    router = make_router(replica("a", {"k@1"}), replica("b"), replica("c"))
    command = HostCommand(op="unload", replica="b", key="k@1")
    pending = request("", command)
    for _ in range(5):
        assert await choose(router, pending) == [["b"]]
    assert pending.routing_context.should_backoff  # so a missing replica is not spun on
    gone = request("", HostCommand(op="unload", replica="zz", key="k@1"))
    assert await choose(router, gone) == [[]]


async def test_a_load_command_marks_its_replica() -> None:
    router = make_router(replica("a", 0, budget(900)), replica("b", 0, budget(100)))
    load = request("", HostCommand(op="load", replica="b", key="k@1"))
    router.on_request_routed(load, rid("b"), object())
    assert await choose(router, request("k@1")) == [["b"]]
    unload = request("", HostCommand(op="unload", replica="b", key="k@1"))
    router.on_request_routed(unload, rid("b"), object())
    assert await choose(router, request("k@1")) == [["a"], ["b"]]


@pytest.mark.parametrize("model_key", ["", None])
async def test_other_calls_use_power_of_two_choices(model_key: str | None) -> None:
    router = make_router(replica("a"), replica("b"), replica("c"))
    pending = request("") if model_key is not None else None
    (chosen,) = await router.choose_replicas(list(router.curr_replicas.values()), pending)
    assert len(chosen) == 2
    assert set(names(chosen)) <= {"a", "b", "c"}


# --------------------------------------------------------------------- the deployments


def test_pools_get_this_router_with_fast_stats_and_ray_pools_serves_default() -> None:
    from ray.serve._private.build_app import build_app as flatten

    from deployments.builder import ROUTING_STATS_PERIOD_S, build_app
    from serve_app.config import AppConfig

    pools = [
        {"name": "ours", "memory_budget": "1GiB"},
        {"name": "stock", "memory_budget": "1GiB", "router": "ray"},
    ]
    built = flatten(build_app(AppConfig.model_validate({"pools": pools})), name="fleet")
    configs = {d.name: d._deployment_config.request_router_config for d in built.deployments}
    ours, stock = configs["ModelHost-ours"], configs["ModelHost-stock"]
    assert ours.request_router_class == "deployments.router.ModelAffinityRouter"
    assert ours.request_routing_stats_period_s == ROUTING_STATS_PERIOD_S
    assert stock == type(stock)()  # Serve's defaults, router class included
