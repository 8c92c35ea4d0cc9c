"""A real Prometheus scrapes the session's Ray metrics endpoints: per-model p99 latency and
hit rate in PromQL agree with `GET /v1/stats`, and the shipped rules load and validate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.prometheus import (
    INSTALL_HINT,
    PrometheusServer,
    check_rules,
    project_root,
    prometheus_available,
    ray_service_discovery_file,
)
from serve_app.observability.metrics import LATENCY_BUCKETS_MS
from serve_app.storage.store import ModelStore
from tests.integration.reference import rows_for
from tests.support import FleetApp, publish_fresh_models, wait_for

pytestmark = pytest.mark.integration

RULES = project_root() / "ops" / "prometheus" / "fleet-rules.yml"
MODELS = ["prom-a", "prom-b", "prom-c", "prom-d"]
WARM = 20
# /v1/stats quantiles are within ~1% of the true sample; a histogram_quantile lies in the
# histogram bucket holding that sample (LATENCY_BUCKETS_MS, 1.33x-1.67x apart).
SKETCH_TOLERANCE = 1.02
LATENCY = "ray_fleet_request_latency_ms_bucket"


def bucket_of(ms: float) -> tuple[float, float]:
    """The (lower, upper] latency histogram bucket holding `ms`."""
    lower = 0.0
    for upper in LATENCY_BUCKETS_MS:
        if ms <= upper:
            return lower, upper
        lower = upper
    return lower, float("inf")


if not prometheus_available():
    pytest.skip(f"the prometheus binary is missing; {INSTALL_HINT}", allow_module_level=True)


@pytest.fixture(scope="module")
def prometheus(
    ray_cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    """Prometheus on a free loopback port, finding the session's Ray nodes through the
    file-SD file Ray writes into its session folder, with the shipped rules loaded."""
    server = PrometheusServer(
        tmp_path_factory.mktemp("prometheus"),
        file_sd_files=[ray_service_discovery_file(ray_cluster["session_dir"])],
        rule_files=[RULES],
    )
    started = time.monotonic()
    server.start()
    try:
        server.wait_ready(timeout_s=60)
        print(f"\nprometheus: ready {time.monotonic() - started:.2f}s after start")
        yield server
    finally:
        server.stop()
        assert not server.is_running()


@pytest.fixture(scope="module")
def traffic(
    app: FleetApp,
    store: ModelStore,
    prometheus: PrometheusServer,
    ray_cluster: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Fresh models (no other test's traffic, so the counters since replica start are
    exactly this traffic), each called once cold then WARM times warm."""
    publish_fresh_models(app, store, tmp_path_factory.mktemp("prom-models"), MODELS, 30)
    with httpx.Client(base_url=app.url, timeout=120) as http:
        for model_id in MODELS:
            rows = rows_for(model_id)
            for n in range(WARM + 1):
                response = http.post(f"/v1/models/{model_id}/predict", json={"inputs": rows})
                assert response.status_code == 200, response.text
                assert response.headers["X-Fleet-Cache"] == ("miss" if n == 0 else "hit")
    sent_at = time.monotonic()

    session = Path(ray_cluster["session_dir"]).name
    selector = f'model=~"{"|".join(MODELS)}",SessionName="{session}"'

    def all_series_in() -> bool:
        requests = prometheus.query_by(
            f"sum by (model) (ray_fleet_requests_total{{{selector}}})", "model"
        )
        looked_up = prometheus.query_by(
            f'sum by (model) ({{__name__=~"ray_fleet_cache_(hits|misses)_total",{selector}}})',
            "model",
        )
        buckets = prometheus.query_by(
            f'sum by (model) ({LATENCY}{{le="+Inf",{selector}}})', "model"
        )
        return all(d.get(m) == WARM + 1 for d in (requests, looked_up, buckets) for m in MODELS)

    wait_for(all_series_in, 90, "every request counted in Prometheus", every_s=0.5)
    print(f"prometheus: all series in {time.monotonic() - sent_at:.2f}s after the last request")
    return {"selector": selector}


def test_promtool_accepts_the_rules() -> None:
    assert "SUCCESS" in check_rules([RULES])  # raises PrometheusError with promtool's output


def listen_addresses(port: int) -> set[str]:
    """Local addresses with a TCP listener on `port` (Linux /proc/net/tcp{,6}, hex form)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_prometheus_discovers_ray_and_listens_on_loopback(
    prometheus: PrometheusServer, ray_cluster: dict[str, Any]
) -> None:
    assert prometheus.endpoint_url == f"http://127.0.0.1:{prometheus.port}"
    assert listen_addresses(prometheus.port) == {"0100007F"}  # 127.0.0.1 only
    node_target = f"127.0.0.1:{ray_cluster['metrics_export_port']}"

    def node_target_up() -> dict[str, Any] | None:
        for target in prometheus.active_targets():
            if target["labels"].get("instance") == node_target and target["health"] == "up":
                return target
        return None

    target = wait_for(node_target_up, 60, f"Prometheus scraping {node_target}", every_s=0.5)
    assert target["discoveredLabels"]["__meta_filepath"].endswith(
        "prom_metrics_service_discovery.json"
    )


def test_prometheus_agrees_with_stats(
    app: FleetApp, prometheus: PrometheusServer, traffic: dict[str, Any]
) -> None:
    selector = traffic["selector"]
    # Whole-life values, no range: Ray creates a series at its first observation, and
    # rate()/increase() ignore a series' first sample, so they would drop the cold request.
    p99 = prometheus.query_by(
        f"histogram_quantile(0.99, sum by (le, model) ({LATENCY}{{{selector}}}))", "model"
    )
    warm_p50 = prometheus.query_by(
        f'histogram_quantile(0.5, sum by (le, model) ({LATENCY}{{cold="false",{selector}}}))',
        "model",
    )
    hit_rate = prometheus.query_by(
        f"sum by (model) (ray_fleet_cache_hits_total{{{selector}}}) / sum by (model) "
        f'({{__name__=~"ray_fleet_cache_(hits|misses)_total",{selector}}})',
        "model",
    )
    report = httpx.get(f"{app.url}/v1/stats", params={"window_s": 900}, timeout=30).json()
    rows = {r["model_id"]: r for r in report["models"]}
    print("model     p99 prom / stats (ms)   warm p50 prom / stats (ms)   hit rate prom / stats")
    for model_id in MODELS:
        row = rows[model_id]
        print(
            f"{model_id:8} {p99[model_id]:9.1f} / {row['p99_ms']:<9.1f}"
            f"{warm_p50[model_id]:12.2f} / {row['warm_p50_ms']:<12.2f}"
            f"{hit_rate[model_id]:10.4f} / {row['hit_rate']:.4f}"
        )
    for model_id in MODELS:
        row = rows[model_id]
        assert row["requests"] == WARM + 1, row
        assert row["cold_starts"] == 1, row
        assert hit_rate[model_id] == pytest.approx(row["hit_rate"], abs=1e-3), model_id
        assert hit_rate[model_id] == pytest.approx(WARM / (WARM + 1), abs=1e-3)
        for prom, stats in (
            (p99[model_id], row["p99_ms"]),
            (warm_p50[model_id], row["warm_p50_ms"]),
        ):
            lower = bucket_of(stats / SKETCH_TOLERANCE)[0]
            upper = bucket_of(stats * SKETCH_TOLERANCE)[1]
            assert lower <= prom <= upper, (model_id, prom, stats, (lower, upper))


def test_rules_load_and_evaluate(
    app: FleetApp, prometheus: PrometheusServer, traffic: dict[str, Any]
) -> None:
    groups = {g["name"]: g for g in prometheus.rule_groups()}
    assert set(groups) == {"fleet-recording", "fleet-alerts"}
    alerts = {r["name"] for r in groups["fleet-alerts"]["rules"]}
    assert alerts == {"FleetThrashing", "FleetLoadFailures", "FleetReplicaNearBudget"}
    hit_ratio = f'model_version:fleet_cache_hit_ratio:rate5m{{model=~"{"|".join(MODELS)}"}}'
    unhealthy: list[dict[str, Any]] = []

    def evaluated_ok() -> bool:
        # the recorded hit ratio exists for every model once rate() has two samples of both
        # counters: from then on an evaluation error in any rule would show here
        if {r["metric"].get("model") for r in prometheus.query(hit_ratio)} != set(MODELS):
            return False
        rules = [r for g in prometheus.rule_groups() for r in g["rules"]]
        unhealthy[:] = [
            {k: r.get(k) for k in ("name", "health", "lastError")}
            for r in rules
            if r.get("health") != "ok"
        ]
        return not unhealthy

    try:
        wait_for(evaluated_ok, 60, "every rule evaluated without error", every_s=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {unhealthy}") from None
    # the budget ratio sees both of this app's host replicas (the prom-* models are on one);
    # other apps' replicas (earlier tests, idle pools) may hold nothing, never over budget
    ratio = {
        r["metric"]["replica"]: float(r["value"][1])
        for r in prometheus.query("replica:fleet_resident_budget_ratio:max")
    }
    print("prometheus: resident/budget per replica", {k: round(v, 4) for k, v in ratio.items()})
    hosts = {r["replica"] for r in app.replicas()}
    assert len(hosts) == 2, hosts
    assert hosts <= set(ratio), (hosts, ratio)
    assert any(ratio[h] > 0 for h in hosts), (hosts, ratio)
    assert all(0 <= v <= 1 for v in ratio.values()), ratio
