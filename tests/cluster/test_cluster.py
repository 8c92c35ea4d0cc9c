"""fleetserve on a real local multi-node Ray cluster (head + 2 worker raylets).

In file order: the nodes and where the replicas run (named in /v1/replicas, `fleetserve
models` and the metrics); a burst of cold requests makes one load per model across nodes and
warm requests go to the holder; the ingress scales out; a hot model gets a copy on another
node; a pool autoscaled on its working set scales out over nodes and back; then a worker
node's raylet is killed under traffic: every request gets 200 or a typed 503 with
Retry-After, Serve brings the replica back on a surviving node, pins come back, every model
answers as before.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from devstack.process import session_members
from devstack.state import load_state
from devstack.workers import stop_workers
from serve_app.api.client import format_models
from serve_app.api.native import CACHE_HEADER
from serve_app.config import AppConfig
from serve_app.storage.manifest import Manifest
from tests.cluster.conftest import LOAD_TIMEOUT_S, PINNED, WORKERS
from tests.cluster.harness import (
    INPUTS,
    App,
    Cluster,
    gauge_nodes,
    holders,
    scrape,
    since,
    total_loads,
)
from tests.support import Traffic, copy_holders, wait_for
from tests.working_set import PEAK, WorkingSetRun, deployed, scale_up_and_down, working_set_config

# NOTE: models 0-7 stay cold until the burst; 8-15 are used around the node kill.
BURST = [f"fraud-merchant-{i:04d}" for i in range(1, 9)]
REPEATS = 4  # concurrent requests per cold model in the burst
API_PINNED = "fraud-merchant-0015"  # pinned through the management API (the model store)
TYPED_503 = {"replica_unavailable", "load_timeout", "no_room", "storage_unavailable"}


def _key(fleet: dict[str, Manifest], model_id: str) -> str:
    return fleet[model_id].key


def test_nodes_and_replicas_are_spread_and_named(cluster: Cluster, app: App) -> None:
    nodes = cluster.alive_nodes()
    assert sorted(nodes.values()) == ["head", *(f"worker-{i}" for i in range(1, WORKERS + 1))]
    replicas = app.replicas()
    assert len(replicas) == 2
    for r in replicas:
        assert r["node_id"] in nodes, r
        assert r["node"] == nodes[r["node_id"]]
        assert r["node_ip"].startswith("127.0.0.")
    # max_replicas_per_node: 1 spreads the pool: two replicas, two nodes, two addresses
    assert len({r["node_id"] for r in replicas}) == 2
    assert len({r["node_ip"] for r in replicas}) == 2
    table = format_models(
        httpx.get(f"{app.url}/v1/models", timeout=30).json()["models"], replicas, time.time()
    )
    for r in replicas:
        assert f"on node {r['node']} ({r['node_ip']}" in table
    print(f"\nreplicas on nodes: {sorted(r['node'] for r in replicas)}")

    def gauges_name_the_nodes() -> bool:
        seen: set[str] = set()
        for url in cluster.metrics_urls().values():
            seen |= gauge_nodes(scrape(url), "ray_fleet_replica_budget_bytes")
        return {r["node"] for r in replicas} <= seen

    wait_for(gauges_name_the_nodes, 90, "replica gauges labelled with their nodes", every_s=2)


def test_cold_burst_loads_each_model_once_and_warm_requests_hit_the_holder(
    app: App, fleet: dict[str, Manifest]
) -> None:
    before = app.replicas()
    loads_before = total_loads(before)
    for model_id in BURST:
        assert not holders(before, _key(fleet, model_id)), f"{model_id} is not cold"
    calls = [m for m in BURST for _ in range(REPEATS)]
    with ThreadPoolExecutor(len(calls)) as pool:
        responses = list(pool.map(lambda m: app.predict(m), calls))
    assert [r.status_code for r in responses] == [200] * len(calls)

    wait_for(lambda: total_loads(app.replicas()) >= loads_before + len(BURST), 20, "the loads")
    after = app.replicas()
    duplicates = total_loads(after) - loads_before - len(BURST)
    where = {m: [r["node"] for r in holders(after, _key(fleet, m))] for m in BURST}
    print(
        f"\nburst: {len(calls)} requests, {len(BURST)} cold models, {duplicates} duplicate "
        f"loads; holders {where}"
    )
    assert duplicates == 0
    assert all(len(nodes) == 1 for nodes in where.values()), where
    assert len({n for nodes in where.values() for n in nodes}) == 2  # both replicas used

    hits_before = {
        m: next(
            e["hits"]
            for e in holders(after, _key(fleet, m))[0]["models"]
            if e["key"] == _key(fleet, m)
        )
        for m in BURST
    }
    for model_id in BURST:
        for _ in range(3):
            resp = app.predict(model_id)
            assert resp.status_code == 200
            assert resp.headers[CACHE_HEADER] == "hit"

    def warm_hits_on_holders() -> bool:
        now = app.replicas()
        for m in BURST:
            (holder,) = holders(now, _key(fleet, m))
            if holder["node"] != where[m][0]:
                return False
            entry = next(e for e in holder["models"] if e["key"] == _key(fleet, m))
            if entry["hits"] < hits_before[m] + 3:
                return False
        return True

    wait_for(warm_hits_on_holders, 20, "warm hits counted on the holding node")
    assert total_loads(app.replicas()) == loads_before + len(BURST)


def test_ingress_scales_out_on_ongoing_requests(app: App) -> None:
    from ray import serve

    def ingress_replicas() -> int:
        status = serve.status().applications["fleet"].deployments["Ingress"]
        return int(status.replica_states.get("RUNNING", 0))

    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            app.predict(BURST[0])

    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        for _ in range(12):
            pool.submit(load)
        try:
            wait_for(lambda: ingress_replicas() >= 2, 90, "a second ingress replica", every_s=1)
        finally:
            stop.set()
    print(f"\ningress: 1 -> 2 replicas after {since(started)}s of 12 concurrent clients")


HOT_APP = "fleet-hot"
HOT_COPIES = {"max_copies": 2, "rate_per_s": 3.0, "window_s": 3.0, "cool_after_s": 3.0}


def test_a_hot_model_gets_a_copy_on_another_node_that_shares_its_traffic(
    app: App, app_config: AppConfig
) -> None:
    """Issue 14 §3 across nodes: a second app (`fleet-hot`, 2 host replicas, one per node,
    hot copies on) serves one hot model beside cold ones: the copy lands on the other node,
    the two copies split the hot traffic fairly, and the copy goes once the model cools."""
    from ray import serve

    from deployments.builder import build_app

    args = app_config.model_dump()
    args["host"]["hot_copies"] = HOT_COPIES
    args["ingress"].pop("autoscaling")
    args["routing"] = {}
    serve.run(build_app(AppConfig.model_validate(args)), name=HOT_APP, route_prefix="/hot")
    hot_app = App(f"{app.url}/hot")
    try:
        wait_for(lambda: len(hot_app.replicas()) == 2, 120, "the hot app's two replicas")
        nodes = {r["replica"]: r["node"] for r in hot_app.replicas()}
        assert len(set(nodes.values())) == 2, nodes  # one replica per node
        hot, cold = "fraud-merchant-0009", [f"fraud-merchant-{i:04d}" for i in range(10, 14)]
        key = f"{hot}@1"
        assert hot_app.predict(hot).status_code == 200
        wait_for(lambda: len(copy_holders(hot_app.replicas(), key)) == 1, 30, "one holder")
        inputs = lambda _model: INPUTS  # noqa: E731
        with Traffic(hot_app.url, cold, inputs, threads=1, pause_s=0.2) as background:
            with Traffic(hot_app.url, [hot], inputs, threads=4, pause_s=0.0) as traffic:
                copies = wait_for(
                    lambda: (h := copy_holders(hot_app.replicas(), key)) and len(h) == 2 and h,
                    60,
                    "a copy of the hot model on the other node",
                )
                started = time.monotonic()
                wait_for(lambda: time.monotonic() - started > 8, 20, "8 s of hot traffic")
            measured = [r for at, _, r in traffic.served if at >= started]
            cooled_at = time.monotonic()
            with Traffic(hot_app.url, [hot], inputs, threads=1, pause_s=1.0) as trickle:
                wait_for(
                    lambda: len(copy_holders(hot_app.replicas(), key)) == 1, 60, "the copy to go"
                )
                gone_s = time.monotonic() - cooled_at
    finally:
        serve.delete(HOT_APP)
    shares = {r: 100 * n / len(measured) for r, n in Counter(measured).items()}
    print(
        f"\nhot copies across nodes: {len(measured)} hot requests in 8 s, shares "
        + ", ".join(f"{nodes[r]} {s:.1f}%" for r, s in sorted(shares.items()))
        + f"; copy dropped {gone_s:.1f}s after cooling"
    )
    assert {nodes[r] for r in copies} == set(nodes.values())  # both nodes hold it
    assert any(copies.values())  # one of them as the extra copy
    assert set(shares) == set(copies), shares
    for replica, share in shares.items():
        assert abs(share - 50) <= 15, (nodes[replica], shares)
    for t in (traffic, background, trickle):
        assert set(t.statuses) == {200}, t.statuses


# the large working set: 9 models, 18.4 MB, the largest (4.2 MB) 68% of a replica's budget;
# the small one, its first two (1.4 MB), fits one replica at target_fill
WS_MODELS = [f"fraud-merchant-{i:04d}" for i in (1, 10, 2, 3, 5, 9, 12, 13, 8)]


def test_working_set_scales_a_pool_out_over_nodes_and_back(
    cluster: Cluster, app: App, app_config: AppConfig, fleet: dict[str, Manifest]
) -> None:
    """Issue 14 §3 across nodes: a second app (`fleet-ws`, tests/working_set.py: one pool
    autoscaling 1-4 replicas on the working set, at most 2 per node) under a trace 3x one
    replica's budget: the pool scales up onto more than one node (hit rate measured), every
    replica serves the reference outputs, and it scales back down with no failed request."""
    ingress = app_config.ingress.model_dump()
    ingress.pop("autoscaling")
    total = sum(fleet[m].total_bytes for m in WS_MODELS)
    config = working_set_config(app_config.store, ingress, total, max_replicas_per_node=2)
    peak: dict[str, str] = {}  # replica -> node, at the peak

    def spread_over_nodes(run: WorkingSetRun) -> None:
        replicas = App(ws_url).replicas()
        alive = cluster.alive_nodes()
        assert all(alive.get(r["node_id"]) == r["node"] for r in replicas), replicas
        peak.update({r["replica"]: r["node"] for r in replicas})
        assert len(peak) == PEAK, peak
        assert len(set(peak.values())) >= 2, peak
        # every scaled-up replica served in the measured phase (outputs checked on each 200)
        serving = {replica for at, _, replica in run.served if at >= run.after_from}
        assert serving == set(peak), (serving, peak)

    with deployed(config, app.url) as ws_url:
        run = scale_up_and_down(ws_url, WS_MODELS, WS_MODELS[:2], at_peak=spread_over_nodes)
    print(
        f"\nworking set across nodes: {total / 1e6:.1f} MB = 3x the budget; {PEAK} replicas "
        f"on nodes {sorted(Counter(peak.values()).items())}; {run.summary()}"
    )


def test_losing_a_worker_node_under_traffic_loses_nothing(
    cluster: Cluster, app: App, fleet: dict[str, Manifest]
) -> None:
    models = sorted(fleet)
    pinned = app.http.put(f"{app.url}/v1/models/{API_PINNED}/pin", timeout=60)
    assert pinned.status_code == 200, pinned.text

    def both_pins_everywhere(replicas: list[dict]) -> bool:
        return all(PINNED in str(r["pinned"]) and API_PINNED in str(r["pinned"]) for r in replicas)

    wait_for(lambda: both_pins_everywhere(app.replicas()), 30, "both pins on every replica")
    expected = {}
    for model_id in models:
        resp = app.predict(model_id)
        assert resp.status_code == 200
        expected[model_id] = resp.json()["outputs"]
    replicas = app.replicas()
    victim_replica = next(r for r in replicas if r["node"].startswith("worker-"))
    victim = cluster.worker(victim_replica["node"])
    survivors = {r["replica"] for r in replicas} - {victim_replica["replica"]}
    lost_models = [m["key"] for m in victim_replica["models"]]

    statuses: Counter[str] = Counter()
    problems: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def traffic(offset: int) -> None:
        i = offset
        with httpx.Client() as http:
            while not stop.is_set():
                model_id = models[i % len(models)]
                i += 1
                try:
                    resp = http.post(
                        f"{app.url}/v1/models/{model_id}/predict",
                        json={"inputs": INPUTS},
                        timeout=LOAD_TIMEOUT_S + 15,
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        statuses["no answer"] += 1
                        problems.append(f"{model_id}: {type(exc).__name__}")
                    continue
                label = str(resp.status_code)
                if resp.status_code == 503:
                    code = resp.json().get("code")
                    label = f"503 {code}"
                    if code not in TYPED_503 or "Retry-After" not in resp.headers:
                        problems.append(f"{model_id}: untyped 503 {resp.text[:200]}")
                elif resp.status_code != 200:
                    problems.append(f"{model_id}: {resp.status_code} {resp.text[:200]}")
                with lock:
                    statuses[label] += 1

    threads = [threading.Thread(target=traffic, args=(k * 5,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(statuses.values()) >= 20, 60, "traffic before the kill")
    killed_at = time.monotonic()
    raylet = victim.crash_raylet()

    def recovered() -> bool:
        now = app.replicas()
        if len(now) != 2 or any(r["node"] == victim.name for r in now):
            return False
        if not both_pins_everywhere(now):
            return False
        return all(app.predict(m, timeout_s=LOAD_TIMEOUT_S + 15).status_code == 200 for m in models)

    try:
        wait_for(
            recovered, 180, "replicas back on surviving nodes, pins, all models 200", every_s=1
        )
        recovery_s = since(killed_at)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=LOAD_TIMEOUT_S + 30)
    print(
        f"\nnode loss: killed raylet {raylet} of {victim.name} (held {lost_models}); "
        f"requests by status {dict(statuses)}; recovered in {recovery_s}s"
    )
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert not problems, problems[:10]
    assert set(statuses) <= {"200"} | {f"503 {c}" for c in TYPED_503}

    after = app.replicas()
    assert {r["node"] for r in after} <= {"head", *(w.name for w in cluster.workers)} - {
        victim.name
    }
    assert len({r["node"] for r in after}) == 2
    assert survivors <= {r["replica"] for r in after}
    for model_id in models:
        resp = app.predict(model_id)
        assert resp.status_code == 200
        assert resp.json()["outputs"] == pytest.approx(expected[model_id], rel=1e-5, abs=1e-6)


def test_down_stops_exactly_the_recorded_workers(cluster: Cluster) -> None:
    """What `fleetserve down` does for workers: every process of every recorded worker
    (the crashed one's leftovers included) is gone; the head, not a worker, still runs."""
    state = load_state(cluster.state_dir)
    pids = [int(w["pid"]) for w in state["workers"]]
    assert sorted(w["name"] for w in state["workers"]) == [w.name for w in cluster.workers]
    stop_workers(cluster.state_dir, state)
    for pid in pids:
        wait_for(lambda pid=pid: not session_members(pid), 30, f"worker session {pid} empty")
    assert "workers" not in load_state(cluster.state_dir)
    assert cluster.head.is_running()
    wait_for(lambda: set(cluster.alive_nodes().values()) == {"head"}, 60, "only the head alive")
