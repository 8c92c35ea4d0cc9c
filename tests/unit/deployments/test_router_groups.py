"""Grouping by replica in the model-affinity router, run for real without Ray: which warm
models the ingress may group on one replica (`hop_target`), a `ReplicaBatch` going only to
the replica it names (or, once that one is gone, by its first model), and every model of a
group counted and marked as if routed alone. Replicas are the light fakes of
test_router_ranking."""

from __future__ import annotations

from types import SimpleNamespace

from deployments import router_registry
from serve_app.gateway.hot_copies import HotCopiesConfig, HotModels
from serve_app.schemas import PredictBatch, ReplicaBatch
from tests.unit.deployments.test_router_ranking import (
    DEPLOYMENT,
    Clock,
    budget,
    choose,
    make_router,
    replica,
    request,
    rid,
)


def batch(key: str, requests: int = 1) -> PredictBatch:
    manifest = SimpleNamespace(key=key)
    return PredictBatch(manifest, [[[1.0]]] * requests, ["r"] * requests)  # type: ignore[arg-type]


def group(replica_name: str, *keys: str) -> ReplicaBatch:
    return ReplicaBatch([batch(k) for k in keys], replica_name)


async def test_only_a_model_one_replica_reports_is_grouped_on_it() -> None:
    router = make_router(replica("a", {"x@1", "both@1"}), replica("b", {"y@1", "both@1"}))
    assert router.hop_target("x@1") == "a"
    assert router.hop_target("y@1") == "b"
    assert router.hop_target("both@1") is None  # two holders: the router picks per call
    assert router.hop_target("cold@1") is None  # nobody holds it: placed as a cold load


async def test_a_model_its_replica_gave_back_is_not_grouped_until_reported_again() -> None:
    a = replica("a", {"x@1"})
    router = make_router(a)
    router.forget_hop_target("x@1")  # the host answered NotResidentHere
    assert router.hop_target("x@1") is None
    router.update_replicas([a])  # its next report still lists it: grouped again
    assert router.hop_target("x@1") == "a"


async def test_the_ingress_finds_the_router_of_its_pool() -> None:
    router = make_router(replica("a", {"x@1"}))
    assert router_registry.router_for(DEPLOYMENT.app_name, DEPLOYMENT.name) is router
    assert router_registry.router_for(DEPLOYMENT.app_name, "ModelHost-other") is None


async def test_a_group_goes_only_to_the_replica_it_names_and_waits_for_it() -> None:
    router = make_router(replica("a", {"x@1", "z@1"}), replica("b", {"y@1"}))
    pending = request("x@1", group("a", "x@1", "z@1"))
    assert await choose(router, pending) == [["a"]]
    assert pending.routing_context.should_backoff  # busy: wait, never another replica


async def test_a_group_for_a_gone_replica_is_routed_by_its_first_model() -> None:
    router = make_router(replica("a", {"x@1"}), replica("b", {"x@1"}))
    (chosen,) = await choose(router, request("x@1", group("gone", "x@1")))
    assert sorted(chosen) == ["a", "b"]


async def test_every_model_of_a_group_is_counted_and_marked() -> None:
    clock = Clock()
    config = HotCopiesConfig.model_validate({"max_copies": 2, "rate_per_s": 5, "window_s": 2})
    router = make_router(replica("a", {"x@1"}), replica("b", 0, budget(500)), clock=clock)
    router.hot = HotModels(config, clock=clock)
    # z@1 is not reported by a yet (its load has just begun): routing marks it there
    router.on_request_routed(request("x@1", group("a", "x@1", "z@1")), rid("a"), object())
    assert router.holders("z@1") == {rid("a")}
    assert router.hop_target("x@1") == "a"
    for _ in range(20):  # x@1 turns hot through grouped calls: it leaves the groups
        router.on_request_routed(request("x@1", group("a", "x@1")), rid("a"), object())
        clock.now += 0.1
    assert router.hot.wanted("x@1") == 2
    assert router.hop_target("x@1") is None
    router.update_replicas(list(router.curr_replicas.values()))
    assert router.hop_target("x@1") is None  # and stays out while hot
