"""`host.eviction_policy: gdsf` on real Ray Serve: a skewed trace, correct answers, budget kept.

A second application (`fleet-gdsf`, route prefix /gdsf, one host replica with a small
budget) runs beside the session's `fleet` app in the same Ray instance and serves the
session's models from the same S3.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from bench.cache_simulation import zipf_trace
from serve_app.config import AppConfig, StoreConfig
from serve_app.storage.manifest import Manifest
from tests.integration.reference import assert_same, expected, inputs_for
from tests.support import FleetApp, fraud_ids, wait_for, wait_healthy

APP = "fleet-gdsf"
GDSF_BUDGET = 30 * 10**6  # about a third of the models the trace touches


@pytest.fixture(scope="module")
def gdsf_app(app: FleetApp, store_config: StoreConfig) -> Iterator[FleetApp]:
    from ray import serve

    from deployments.builder import build_app

    config = AppConfig.model_validate(
        {
            "store": store_config.model_dump(),
            "host": {
                "num_replicas": 1,
                "num_cpus": 0.5,
                "accelerator": "cpu",
                "memory_budget": GDSF_BUDGET,
                "eviction_policy": "gdsf",
                "load_timeout_s": 60,
                "disk_cache_bytes": "200MB",
            },
            "ingress": {**app.config.ingress.model_dump(), "num_cpus": 0.25},
        }
    )
    serve.run(build_app(config), name=APP, route_prefix="/gdsf", blocking=False)
    gdsf = FleetApp(f"{app.url}/gdsf", config)

    wait_healthy(gdsf.url, 180, "the gdsf app to become healthy")
    wait_for(lambda: len(gdsf.replicas()) == 1, 60, "its host replica")
    yield gdsf
    serve.delete(APP)


def test_gdsf_replica_serves_a_skewed_trace_within_its_budget(
    gdsf_app: FleetApp, fleet: dict[str, Manifest]
) -> None:
    keys = [f"{m}@1" for m in fraud_ids()[:18]] + ["text-clf-sentiment@1", "text-clf-topic@1"]
    models = [(key, fleet[key].weight_bytes, 0.0) for key in keys]
    trace = zipf_trace(models, alpha=0.8, length=50, seed=0)
    touched = {r.key: r.nbytes for r in trace}
    assert sum(touched.values()) > 2 * GDSF_BUDGET, "the trace must force evictions"
    rng = random.Random(5)
    started = time.monotonic()
    hits = 0
    for request in trace:
        model_id = request.key.partition("@")[0]
        inputs = inputs_for(model_id)
        response = gdsf_app.predict(model_id, inputs, version="1")
        assert response.status_code == 200, (request.key, response.text)
        body = response.json()
        assert body["model_id"] == model_id
        assert_same(model_id, body["outputs"], expected(model_id, inputs))
        hits += body["resident"] is True
        if rng.random() < 0.3 or request is trace[-1]:
            (replica,) = gdsf_app.replicas()
            assert replica["resident_bytes"] <= GDSF_BUDGET, replica
            assert replica["peak_resident_bytes"] <= GDSF_BUDGET, replica
    # the replica's report is refreshed on changes and on a heartbeat: wait for all requests
    replica = wait_for(
        lambda: next(
            (r for r in gdsf_app.replicas() if r["hits"] + r["misses"] == len(trace)), None
        ),
        30,
        "the replica's report to count every request",
    )
    assert replica["eviction_policy"] == "gdsf"
    assert replica["budget_bytes"] == GDSF_BUDGET
    assert replica["evictions"] > 0
    assert replica["hits"] > 0
    assert hits > 0
    assert sum(m["bytes"] for m in replica["models"]) == replica["resident_bytes"]
    print(
        f"\ngdsf: {len(trace)} requests over {len(touched)} models in "
        f"{time.monotonic() - started:.1f}s; hits={replica['hits']} misses={replica['misses']} "
        f"evictions={replica['evictions']}; resident {replica['resident_bytes'] / 1e6:.1f} MB, "
        f"peak {replica['peak_resident_bytes'] / 1e6:.1f} MB of {GDSF_BUDGET / 1e6:.0f} MB"
    )
