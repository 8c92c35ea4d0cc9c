"""Hot-model copies in the model-affinity router, run for real without Ray: a warm model
over its rate gets one request sent to a non-holder (flagged `hot_copy`), one copy per
request, never a copy of a cold model; once it cools, its traffic skips the replicas that
report it as an extra copy. Replicas are the light fakes of test_router_ranking."""

from __future__ import annotations

from types import SimpleNamespace

from deployments.router import ModelAffinityRouter
from serve_app.gateway.hot_copies import HotCopiesConfig, HotModels
from serve_app.schemas import PredictBatch
from tests.unit.deployments.test_router_ranking import (
    Clock,
    budget,
    choose,
    make_router,
    replica,
    request,
    rid,
)

CONFIG = {"max_copies": 2, "rate_per_s": 5, "window_s": 2, "cool_after_s": 10}


def batch(key: str = "k@1") -> PredictBatch:
    return PredictBatch(SimpleNamespace(key=key), [[1.0]], ["r"])  # type: ignore[arg-type]


def hot_router(*replicas: SimpleNamespace, clock: Clock) -> ModelAffinityRouter:
    router = make_router(*replicas, clock=clock)
    router.initialize_state(hot_copies=CONFIG)
    router.hot = HotModels(HotCopiesConfig.model_validate(CONFIG), clock=clock)
    return router


def heat(router: ModelAffinityRouter, clock: Clock, holder: str, requests: int = 20) -> None:
    for _ in range(requests):  # 20 in 2 s: 10/s, over one copy's 5/s
        router.on_request_routed(request("k@1", batch()), rid(holder), object())
        clock.now += 0.1


async def test_a_hot_model_gets_one_copy_on_the_best_placed_non_holder() -> None:
    clock = Clock()
    a = replica("a", {"k@1"}, budget(100))
    b, c = replica("b", 0, budget(300)), replica("c", 0, budget(900))
    router = hot_router(a, b, c, clock=clock)
    pending = request("k@1", batch())
    assert await choose(router, pending) == [["a"]]  # warm, not hot: the holder
    assert pending.args[0].copy_on is None
    heat(router, clock, "a")
    pending = request("k@1", batch())
    assert await choose(router, pending) == [["c"], ["a"]]  # most free budget, then holder
    assert pending.args[0].copy_on == "c"
    router.on_request_routed(pending, rid("c"), object())  # c now holds (marked)
    for _ in range(5):  # wanted 2, held by 2: no further copy, both serve
        pending = request("k@1", batch())
        (chosen,) = await choose(router, pending)
        assert sorted(chosen) == ["a", "c"]
        # until c reports its copy, every request names it (Serve's FIFO may hand c to
        # another pending request for the model than the one that chose it)
        assert pending.args[0].copy_on == "c"
    c.routing_stats = {**c.routing_stats, "copy_keys": ["k@1"]}
    c.multiplexed_model_ids = {"k@1"}
    router.update_replicas([a, b, c])
    pending = request("k@1", batch())
    (chosen,) = await choose(router, pending)
    assert sorted(chosen) == ["a", "c"]
    assert pending.args[0].copy_on is None  # reported: requests stop naming it


async def test_a_cold_model_is_placed_once_however_hot() -> None:
    clock = Clock()
    router = hot_router(replica("a", 0, budget(900)), replica("b", 0, budget(100)), clock=clock)
    heat(router, clock, "a")  # rate counted, but nobody holds it (reports say so)
    router.marks = type(router.marks)(clock=clock)
    pending = request("k@1", batch())
    assert await choose(router, pending) == [["a"], ["b"]]  # the cold path: one load
    assert pending.args[0].copy_on is None


async def test_once_cool_the_copy_holders_get_no_traffic() -> None:
    clock = Clock()
    a = replica("a", {"k@1"}, budget(100))
    b = replica("b", {"k@1"}, {**budget(100), "copy_keys": ["k@1"]})
    router = hot_router(a, b, clock=clock)
    heat(router, clock, "a")
    (chosen,) = await choose(router, request("k@1", batch()))
    assert sorted(chosen) == ["a", "b"]  # hot: both copies serve
    clock.now += 3  # the window passed: cool
    for _ in range(5):
        assert await choose(router, request("k@1", batch())) == [["a"]]


async def test_copies_off_by_default() -> None:
    clock = Clock()
    router = make_router(replica("a", {"k@1"}), replica("b", 0), clock=clock)
    heat(router, clock, "a", requests=500)
    pending = request("k@1", batch())
    assert await choose(router, pending) == [["a"]]
    assert pending.args[0].copy_on is None


def test_pools_pass_hot_copies_to_their_router() -> None:
    from ray.serve._private.build_app import build_app as flatten

    from deployments.builder import build_app
    from serve_app.config import AppConfig

    host = {"memory_budget": "1GiB", "hot_copies": CONFIG}
    built = flatten(build_app(AppConfig.model_validate({"host": host})), name="fleet")
    (config,) = [
        d._deployment_config.request_router_config
        for d in built.deployments
        if d.name == "ModelHost"
    ]
    assert config.request_router_kwargs["hot_copies"]["max_copies"] == 2
