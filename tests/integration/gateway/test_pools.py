"""Versions, A/B splits, pins and isolated pools on real Ray Serve, deployed like an operator
does it: `serve deploy <config.yaml>` against the session cluster's dashboard.

The `pools` app (route /pools) has two ingress replicas and two pools: `tabular` (fraud
models, the default pool) and `text` (text classifiers, and models tagged `pool-text`). Its
routing splits `fraud-ab` 90/10 with a shadow arm and pins the split's arms and one
classifier; it is the `user_config` of the Ingress (routing) and of both host deployments
(their pins), as the README's config shows.
Tests run in file order: the last ones redeploy the app.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve_app.storage.manifest import Manifest
from serve_app.storage.store import ModelStore
from tests.integration.reference import assert_same, expected, inputs_for
from tests.support import ADMIN, ADMIN_KEY, FleetApp, fraud_ids, wait_for

pytestmark = pytest.mark.integration

APP = "pools"
ARM_A, ARM_B, SHADOW = "fraud-merchant-0001@1", "fraud-merchant-0003@1", "fraud-merchant-0006@1"
TAGGED = "tagged-text-0"
TABULAR_BUDGET = 25 * 10**6  # fraud fleet is ~124 MB: a storm evicts
TEXT_BUDGET = 30 * 10**6  # sentiment (~5 MB) + topic (~19 MB) + a small tagged model


def routing(weights: tuple[int, int] = (90, 10), pins: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "sticky_header": "X-User-Id",
        "aliases": {
            "fraud-ab": {
                "arms": [
                    {"target": ARM_A, "weight": weights[0]},
                    {"target": ARM_B, "weight": weights[1]},
                ],
                "shadow": {"target": SHADOW},
            }
        },
        "rules": [{"pattern": "text-*", "pool": "text"}, {"tag": "pool-text", "pool": "text"}],
        "pins": ["fraud-ab", "text-clf-sentiment", *pins],
    }


def write_config(
    path: Path, store_url: str, route: dict[str, Any], text_budget: int | None = TEXT_BUDGET
) -> Path:
    host = {"num_replicas": 1, "num_cpus": 0.25, "accelerator": "cpu", "load_timeout_s": 60}
    text = {"memory_budget": text_budget} if text_budget is not None else {}
    config = {
        "applications": [
            {
                "name": APP,
                "route_prefix": f"/{APP}",
                "import_path": "deployments.builder:build_app",
                "args": {
                    "store": {"url": store_url},
                    "pools": [
                        {"name": "tabular", "memory_budget": TABULAR_BUDGET, **host},
                        {"name": "text", **text, **host},
                    ],
                    # two ingress replicas: splits stay sticky and /v1/routing's per-arm
                    # counters are merged across them
                    "ingress": {
                        "num_cpus": 0.1,
                        "registry_refresh_s": 1.0,
                        "num_replicas": 2,
                        "management": {"admin_key": ADMIN_KEY},
                    },
                },
                # the routing: the Ingress routes by it, each pool's hosts keep its pins
                "deployments": [
                    {"name": name, "user_config": route}
                    for name in ("Ingress", "ModelHost-tabular", "ModelHost-text")
                ],
            }
        ]
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def serve_deploy(cluster: dict[str, Any], config: Path) -> None:
    """`serve deploy config.yaml` against the session cluster, as an operator runs it."""
    serve_cli = Path(sys.executable).parent / "serve"
    done = subprocess.run(
        [str(serve_cli), "deploy", str(config), "-a", cluster["dashboard_url"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def app_status() -> tuple[str, str]:
    from ray import serve

    status = serve.status().applications.get(APP)
    if status is None:
        return "NOT_STARTED", ""
    return str(getattr(status.status, "value", status.status)), status.message


class Pools:
    """The deployed `pools` app, seen over HTTP."""

    def __init__(self, base: str) -> None:
        self.url = f"{base}/{APP}"

    def predict(self, model: str, inputs: list[Any], **headers: str) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/models/{model}/predict",
            json={"inputs": inputs},
            headers=headers,
            timeout=120,
        )

    def routing(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/v1/routing", timeout=30).json()

    def hosts_list(self) -> list[dict[str, Any]]:
        """Every host replica's status (a management call: with the admin key)."""
        return httpx.get(f"{self.url}/v1/replicas", headers=ADMIN, timeout=30).json()

    def hosts(self) -> dict[str, dict[str, Any]]:
        """pool -> its (single) replica's status."""
        return {r["pool"]: r for r in self.hosts_list()}

    def resident(self, pool: str) -> dict[str, dict[str, Any]]:
        return {m["key"]: m for m in self.hosts()[pool]["models"]}


@pytest.fixture(scope="module")
def pools(
    app: FleetApp,
    ray_cluster: dict[str, Any],
    store: ModelStore,
    fleet: dict[str, Manifest],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pools]:
    from ray import serve

    from devstack.demo_fleet import write_fraud_model
    from serve_app.storage.publisher import publish_path

    root = tmp_path_factory.mktemp("pools")
    publish_path(store, write_fraud_model(root / TAGGED, 2), TAGGED, "1", tags=["pool-text"])
    config = write_config(root / "pools.yaml", store.config.url, routing())
    started = time.monotonic()
    serve_deploy(ray_cluster, config)
    wait_for(lambda: app_status()[0] == "RUNNING", 240, "the pools app to run", every_s=0.5)
    client = Pools(app.url)
    wait_for(lambda: len(client.hosts()) == 2, 60, "both pools' hosts")
    wait_for(
        lambda: (
            set(client.hosts()["tabular"]["pinned"]) == {ARM_A, ARM_B}
            and set(client.resident("tabular")) >= {ARM_A, ARM_B}
            and "text-clf-sentiment@1" in client.resident("text")
        ),
        60,
        "the pins to be resident",
    )
    print(f"\npools app deployed with serve deploy in {time.monotonic() - started:.1f}s")
    yield client
    serve.delete(APP)


def test_versions_aliases_and_pools_route_by_config(pools: Pools) -> None:
    model = fraud_ids()[4]
    by_at = pools.predict(f"{model}@1", inputs_for(model))
    by_path = httpx.post(
        f"{pools.url}/v1/models/{model}/versions/1/predict",
        json={"inputs": inputs_for(model)},
        timeout=60,
    )
    assert by_at.status_code == by_path.status_code == 200, by_at.text
    assert by_at.json()["outputs"] == by_path.json()["outputs"]
    assert_same(f"{model}@1", by_at.json()["outputs"], expected(model, inputs_for(model)))
    missing = pools.predict(f"{model}@9", inputs_for(model))
    assert (missing.status_code, missing.json()["code"]) == (404, "version_not_found")
    # placement: fraud -> tabular (default pool), text-* and the tagged model -> text
    text = pools.predict("text-clf-topic", inputs_for("text-clf-topic"))
    tagged = pools.predict(TAGGED, inputs_for("fraud-x"))
    assert text.status_code == tagged.status_code == 200
    text_replica = pools.hosts()["text"]["replica"]
    assert text.json()["replica"] == tagged.json()["replica"] == text_replica
    assert by_at.json()["replica"] == pools.hosts()["tabular"]["replica"]


def test_split_is_sticky_names_its_arm_and_shadows(
    pools: Pools, ray_cluster: dict[str, Any]
) -> None:
    rows = inputs_for("fraud-x")
    seen: dict[str, str] = {}
    for i in range(120):
        response = pools.predict("fraud-ab", rows, **{"X-User-Id": f"user-{i % 60}"})
        assert response.status_code == 200, response.text
        body = response.json()
        arm = response.headers["X-Fleet-Arm"]
        assert arm == body["arm"] == f"{body['model_id']}@{body['version']}"
        assert seen.setdefault(f"user-{i % 60}", arm) == arm  # sticky
        assert_same(arm, body["outputs"], expected(body["model_id"], rows))
    assert set(seen.values()) == {ARM_A, ARM_B}

    def served() -> int:
        rows = {(a["arm"], a["role"]): a["requests"] for a in pools.routing()["arms"]}
        return rows.get((ARM_A, "serve"), 0) + rows.get((ARM_B, "serve"), 0)

    # the proxy spreads requests over both ingress replicas; each merges the other's
    # counters as last published (every 2 s), so soon either one reports all 120
    wait_for(
        lambda: httpx.get(f"{pools.url}/v1/stats", timeout=30).json()["replicas"] == 2,
        30,
        "both ingress replicas publishing",
    )
    wait_for(
        lambda: all(served() == 120 for _ in range(6)),
        30,
        "per-arm counts merged across ingress replicas",
    )
    # the handle API (Ray jobs) takes the sticky key as an argument
    from ray import serve

    handle = serve.get_app_handle(APP)
    for user in ("user-1", "user-2", "user-3"):
        result = handle.predict.remote("fraud-ab", rows, sticky_key=user).result(timeout_s=60)
        assert result["arm"] == seen[user]
    shadow = wait_for(
        lambda: (
            (s := pools.routing()["arms"])
            and next(
                (a for a in s if a["role"] == "shadow" and a["requests"] + a["dropped"] >= 120),
                None,
            )
        ),
        30,
        "the shadow copies to be recorded",
    )
    assert shadow["arm"] == SHADOW
    assert shadow["errors"] == 0
    assert shadow["p50_ms"] is not None
    # the shadow never answers the caller, and the candidate was really served
    assert SHADOW in pools.resident("tabular") or pools.hosts()["tabular"]["evictions"] > 0
    # per-arm Prometheus series, on the node's Ray metrics endpoint
    metrics_url = f"http://127.0.0.1:{ray_cluster['metrics_export_port']}/metrics"

    def arm_series() -> list[str]:
        text = httpx.get(metrics_url, timeout=10).text
        return [
            line
            for line in text.splitlines()
            if line.startswith("ray_fleet_arm_requests_total{") and 'alias="fraud-ab"' in line
        ]

    series = wait_for(
        lambda: (lines := arm_series()) and any('role="shadow"' in x for x in lines) and lines,
        60,
        "per-arm metrics",
        every_s=1.0,
    )
    assert any(f'arm="{ARM_A}"' in x and 'role="serve"' in x for x in series), series


# Two closed-loop clients cycling through `ids` (7 apart) until `stop` exists.
STORM = """
import json, sys, threading, pathlib, httpx
url, stop, ids = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
codes = {}
def run(offset):
    i = offset
    with httpx.Client(timeout=120) as client:
        while not stop.exists():
            rows = [[0.1 * (j % 7) for j in range(32)]]
            r = client.post(f"{url}/v1/models/{ids[i % len(ids)]}/predict", json={"inputs": rows})
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            i += 7
threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(codes))
"""


def traffic(pools: Pools, stop_file: Path, ids: list[str]) -> subprocess.Popen:
    """Start STORM in its own process, so its client threads do not compete with the
    measuring client for this interpreter's GIL."""
    return subprocess.Popen(
        [sys.executable, "-c", STORM, pools.url, str(stop_file), *ids],
        stdout=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, stop_file: Path) -> Counter[int]:
    stop_file.touch()
    out, _ = process.communicate(timeout=120)
    return Counter({int(k): v for k, v in json.loads(out).items()})


def warm_latencies(pools: Pools, client: httpx.Client, n: int) -> list[float]:
    """`n` sequential warm requests to the text pool; milliseconds each."""
    model = "text-clf-sentiment"
    inputs = inputs_for(model)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = client.post(f"{pools.url}/v1/models/{model}/predict", json={"inputs": inputs})
        out.append((time.perf_counter() - t0) * 1000)
        assert response.status_code == 200
        assert response.json()["resident"] is True
    return out


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def storm_against_warm(pools: Pools, tmp_path: Path, samples: int) -> float:
    """Cold requests over 40 fraud models in `tabular` while timing warm requests in `text`.

    Asserts the memory isolation (nothing evicted in `text`, pins kept in `tabular`) and
    returns the text pool's warm p99 under the storm over its quiet p99.
    """
    client = httpx.Client(timeout=60)
    warm_latencies(pools, client, 20)
    text_before = pools.hosts()["text"]
    tabular_before = pools.hosts()["tabular"]
    quiet = warm_latencies(pools, client, samples)
    stop_file = tmp_path / "stop"
    storm = traffic(pools, stop_file, fraud_ids())
    started = time.monotonic()
    try:
        wait_for(
            lambda: pools.hosts()["tabular"]["misses"] >= tabular_before["misses"] + 3,
            60,
            "the storm to be under way",
        )
        stormy = warm_latencies(pools, client, samples)
    finally:
        storm_codes = finish(storm, stop_file)
        client.close()
    rate = sum(storm_codes.values()) / (time.monotonic() - started)
    text_after = pools.hosts()["text"]
    tabular_after = pools.hosts()["tabular"]
    assert set(storm_codes) == {200}, storm_codes
    assert tabular_after["evictions"] > tabular_before["evictions"]
    assert tabular_after["misses"] - tabular_before["misses"] >= 10
    assert text_after["evictions"] == text_before["evictions"]
    assert {m["key"] for m in text_after["models"]} >= {m["key"] for m in text_before["models"]}
    assert set(pools.hosts()["tabular"]["pinned"]) == {ARM_A, ARM_B}
    assert {ARM_A, ARM_B} <= set(pools.resident("tabular"))  # pins survived the storm
    print(
        f"\nisolation: {sum(storm_codes.values())} storm requests ({rate:.1f}/s), "
        f"{tabular_after['evictions'] - tabular_before['evictions']} evictions in tabular, "
        f"0 in text; text warm p50 {statistics.median(quiet):.1f} -> "
        f"{statistics.median(stormy):.1f} ms, p99 {p99(quiet):.1f} -> {p99(stormy):.1f} ms "
        f"({p99(stormy) / p99(quiet):.2f}x)"
    )
    return p99(stormy) / p99(quiet)


def test_storm_in_one_pool_evicts_nothing_in_the_other(pools: Pools, tmp_path: Path) -> None:
    """Memory isolation, plus a coarse latency guard: had the storm reached the text pool,
    its warm requests would turn into loads (many times slower)."""
    assert storm_against_warm(pools, tmp_path, samples=200) <= 3.0


@pytest.mark.slow
def test_storm_keeps_the_other_pools_warm_p99_within_1_5x(pools: Pools, tmp_path: Path) -> None:
    """The issue's latency criterion. On the 2-vCPU dev box this measured 1.34x-2.64x: the
    closed-loop storm takes whatever CPU the shared proxy and ingress and its own host leave
    (every cost removed here raised its rate, 20 -> 29 req/s), and the text pool's requests
    share those two cores. Run it where the gateway and the pools get their own cores."""
    assert storm_against_warm(pools, tmp_path, samples=600) <= 1.5


def test_restarted_host_gets_its_config_pins_and_api_pins_back(
    pools: Pools, store: ModelStore
) -> None:
    """A host replica killed with `ray.kill` comes back with the routing's pins (its
    user_config, applied by reconfigure() before it serves) and the management API's pins
    (records in the model store, not in Ray's internal KV)."""
    import ray

    from serve_app.management.pins import PinStore
    from serve_app.storage.state_store import StoreKeyValue

    model = fraud_ids()[21]
    key = f"{model}@1"
    url = f"{pools.url}/v1/models/{model}/pin"
    try:
        assert httpx.put(url, headers=ADMIN, timeout=120).status_code == 200
        records = PinStore(StoreKeyValue.of(ModelStore(store.config)), APP).list()
        assert [(r.key, r.pool, r.source) for r in records] == [(key, "tabular", "api")]
        victim = pools.hosts()["tabular"]
        assert {ARM_A, ARM_B, key} <= set(victim["pinned"])
        ray.kill(ray.get_actor(victim["actor_name"], namespace=victim["namespace"]))
        killed_at = time.monotonic()

        def replaced() -> dict[str, Any] | None:
            host = {r["pool"]: r for r in pools.hosts_list()}
            new = host.get("tabular")
            if new is None or new["replica"] == victim["replica"]:
                return None
            resident = {m["key"] for m in new["models"]}
            want = {ARM_A, ARM_B, key}
            return new if want <= set(new["pinned"]) and want <= resident else None

        new = wait_for(replaced, 180, "a new tabular host with every pin resident", every_s=0.5)
        back_s = time.monotonic() - killed_at
        assert new["pin_errors"] == {}
        assert pools.predict("fraud-ab", inputs_for("fraud-x")).status_code == 200
    finally:
        httpx.delete(url, headers=ADMIN, timeout=120)
    wait_for(lambda: key not in pools.hosts()["tabular"]["pinned"], 30, "the API pin released")
    assert {ARM_A, ARM_B} <= set(pools.hosts()["tabular"]["pinned"])  # config pins stay
    print(f"\nrestarted tabular host with config and API pins resident after {back_s:.1f}s")


def test_live_change_reconfigures_without_restarts_reloads_or_drops(
    pools: Pools, ray_cluster: dict[str, Any], store: ModelStore, tmp_path: Path
) -> None:
    """`serve deploy` with new weights, a new pin and a new rule: applied in place."""
    topic = "text-clf-topic@1"
    assert pools.predict("text-clf-topic", inputs_for("text-clf-topic")).status_code == 200
    before = pools.hosts()
    resident_before = {pool: {m["key"]: m for m in r["models"]} for pool, r in before.items()}
    assert topic in resident_before["text"]
    sticky = {f"u{i}": pools.predict("fraud-ab", inputs_for("fraud-x"), **{"X-User-Id": f"u{i}"})
              for i in range(40)}  # fmt: skip
    stop = threading.Event()
    codes: Counter[int] = Counter()

    def traffic() -> None:
        while not stop.is_set():
            for model in ("fraud-ab", "text-clf-sentiment", fraud_ids()[1]):
                codes[pools.predict(model, inputs_for(model)).status_code] += 1

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        changed = routing(weights=(50, 50), pins=("text-clf-topic",))
        config = write_config(tmp_path / "pools.yaml", store.config.url, changed)
        started = time.monotonic()
        serve_deploy(ray_cluster, config)
        wait_for(
            lambda: pools.routing()["active"]["aliases"]["fraud-ab"]["arms"][0]["weight"] == 50,
            60,
            "the new split to be active",
        )
        applied_s = time.monotonic() - started
        wait_for(lambda: topic in pools.hosts()["text"]["pinned"], 30, "the new pin")
        sync = wait_for(
            lambda: (r := pools.routing()["hosts"])["in_sync"] and r, 30, "hosts' pins in sync"
        )
        assert {r["pool"] for r in sync["replicas"]} == {"tabular", "text"}
        assert all("text-clf-topic" in r["routing_pins"] for r in sync["replicas"])
        time.sleep(0.5)  # traffic keeps flowing a little after the change
    finally:
        stop.set()
        thread.join(timeout=120)
    assert set(codes) == {200}, codes  # nothing dropped during the change
    after = pools.hosts()
    for pool in ("tabular", "text"):
        assert after[pool]["replica"] == before[pool]["replica"], "a host replica restarted"
        resident_after = {m["key"]: m for m in after[pool]["models"]}
        for key in (ARM_A, ARM_B, "text-clf-sentiment@1", topic):
            if key in resident_before[pool]:
                assert resident_after[key]["loaded_at"] == resident_before[pool][key]["loaded_at"]
    assert after["text"]["loads"] == before["text"]["loads"]  # the new pin was resident
    assert resident_after[topic]["pinned"] is True
    moved = sum(
        pools.predict("fraud-ab", inputs_for("fraud-x"), **{"X-User-Id": k}).headers["X-Fleet-Arm"]
        != r.headers["X-Fleet-Arm"]
        for k, r in sticky.items()
    )
    print(
        f"\nlive change: applied {applied_s:.1f}s after serve deploy started, "
        f"{sum(codes.values())} requests during it, all 200; {moved}/40 sticky keys moved arm"
    )


def test_bad_routing_is_refused_and_the_app_keeps_serving(
    pools: Pools, ray_cluster: dict[str, Any], store: ModelStore, tmp_path: Path
) -> None:
    active = pools.routing()["active"]
    bad = routing(weights=(80, 30))
    serve_deploy(ray_cluster, write_config(tmp_path / "bad.yaml", store.config.url, bad))
    rejected = wait_for(lambda: pools.routing()["rejected"], 60, "the refusal")
    assert "arm weights add up to 110, not 100: change them so they sum to 100" in rejected["error"]
    assert pools.routing()["active"] == active
    assert pools.predict("fraud-ab", inputs_for("fraud-x")).status_code == 200
    unknown = routing()
    unknown["aliases"]["fraud-ab"]["arms"][1]["target"] = "fraud-nope@1"
    serve_deploy(ray_cluster, write_config(tmp_path / "bad2.yaml", store.config.url, unknown))
    wait_for(
        lambda: (
            "model 'fraud-nope' is not published"
            in (pools.routing()["rejected"] or {}).get("error", "")
        ),
        60,
        "the second refusal",
    )
    assert pools.routing()["active"] == active
    # the other ingress replica may still be applying (and refusing) it: DEPLOYING till then
    wait_for(lambda: app_status()[0] == "RUNNING", 60, "the app to settle as RUNNING")
    assert pools.routing()["active"] == active


def test_bad_pool_config_fails_the_build_and_the_app_keeps_serving(
    pools: Pools, ray_cluster: dict[str, Any], store: ModelStore, tmp_path: Path
) -> None:
    """Runs last: it leaves the app in DEPLOY_FAILED (with the old replicas serving)."""
    replica = pools.hosts()["tabular"]["replica"]
    config = write_config(tmp_path / "nobudget.yaml", store.config.url, routing(), None)
    serve_deploy(ray_cluster, config)
    _, message = wait_for(
        lambda: (s := app_status())[0] == "DEPLOY_FAILED" and s, 120, "the build to fail"
    )
    assert "pool 'text' has no memory budget: set memory_budget" in message, message
    for _ in range(5):
        assert pools.predict("fraud-ab", inputs_for("fraud-x")).status_code == 200
    assert pools.hosts()["tabular"]["replica"] == replica
