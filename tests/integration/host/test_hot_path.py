"""The request hot path on real Ray Serve: per-model batching and cold-request placement."""

from __future__ import annotations

import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from devstack.demo_fleet import FRAUD_FEATURES
from serve_app.storage.manifest import Manifest
from serve_app.storage.store import ModelStore
from tests.integration.reference import TEXTS, assert_same, expected
from tests.support import FleetApp, fraud_ids, publish_fresh_models, wait_for

# NOTE: Ray's multiplexed matching timeout is drawn from [1 s, 2 s]; a cold request that
# waited it out would spend at least this long before any replica took it.
MATCHING_TIMEOUT_S = 1.0


def _rows(seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[round(rng.uniform(-2, 2), 4) for _ in range(FRAUD_FEATURES)] for _ in range(2)]


def _send_all(app: FleetApp, calls: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """Send every (model, inputs) call from 16 threads; each must answer 200."""

    def send(call: tuple[str, list[Any]]) -> dict[str, Any]:
        response = app.predict(*call)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(send, calls))


def _largest_batch(app: FleetApp, model_id: str, inputs: list[Any]) -> int:
    # NOTE: a host publishes its counters at most once a second, after a request.
    app.predict(model_id, inputs)
    return max(r.get("largest_batch", 0) for r in app.replicas())


def test_concurrent_requests_batch_and_answer_like_single_ones(
    app: FleetApp, fleet: dict[str, Manifest]
) -> None:
    """Concurrent requests for one model (tabular and text) are batched, never mixed with
    another model's, and each gets exactly the answer a direct run of the model gives."""
    fraud = fraud_ids()[3]
    calls: list[tuple[str, list[Any]]] = [(fraud, _rows(i)) for i in range(24)]
    calls += [("minilm-embed", [TEXTS[i % 2], f"text number {i}"]) for i in range(12)]
    random.Random(1).shuffle(calls)
    # warm first: the batches to check form on resident models
    assert app.predict(fraud, _rows(0)).status_code == 200
    assert app.predict("minilm-embed", TEXTS).status_code == 200

    bodies = _send_all(app, calls)
    for (model_id, inputs), body in zip(calls, bodies, strict=True):
        assert body["model_id"] == model_id
        assert len(body["outputs"]) == len(inputs)
        assert_same(model_id, body["outputs"], expected(model_id, inputs))
    wait_for(
        lambda: _largest_batch(app, fraud, _rows(0)) > 1,
        15,
        "a host to report a batch of more than one request",
        every_s=0.5,
    )


def _first_requests(app: FleetApp, model_id: str, clients: int = 3) -> dict[str, Any]:
    """A burst of concurrent requests: whether any was a miss, and its time beyond the load
    (slowest latency minus the longest load wait: requests queued in the ingress behind the
    loading batch report no wait of their own)."""
    body = {"inputs": _rows(7)}

    def one(_: int) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        response = httpx.post(f"{app.url}/v1/models/{model_id}/predict", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return time.perf_counter() - started, response.json()

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    return {
        "miss": any(not r["resident"] for _, r in results),
        "overhead_s": max(t for t, _ in results)
        - max(r["load_wait_ms"] for _, r in results) / 1000,
    }


def test_cold_requests_are_placed_without_waiting_for_a_holder(
    app: FleetApp, store: ModelStore, tmp_path: Path
) -> None:
    """A model no replica holds, never seen or evicted, is placed at once: no request of a
    concurrent burst spends Ray's multiplexed matching timeout before a replica takes it."""
    ids = [f"hot-cold-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    publish_fresh_models(app, store, tmp_path, ids, first_index=2)
    first = [_first_requests(app, model_id) for model_id in ids]
    assert all(burst["miss"] for burst in first)
    # push them out of every replica: two ~91 MB embedders, one per 95 MB replica
    for version in ("1", "2"):
        response = app.predict("minilm-embed", TEXTS, version=version)
        assert response.status_code == 200
    held = {m["key"] for r in app.replicas() for m in r["models"]}
    evicted = [m for m in ids if f"{m}@1" not in held]
    assert evicted, held
    again = [_first_requests(app, model_id) for model_id in evicted]
    assert all(burst["miss"] for burst in again)
    worst = max(r["overhead_s"] for r in first + again)
    assert worst < MATCHING_TIMEOUT_S, [round(r["overhead_s"], 3) for r in first + again]


def test_requests_for_warm_models_of_one_replica_travel_in_one_call(
    app: FleetApp, fleet: dict[str, Manifest]
) -> None:
    """With traffic spread over several warm models, the ingress groups the requests whose
    models one replica holds into one call (`group_by_replica`): every answer is still the
    model's own, and the hosts report calls that carried several models."""
    models = fraud_ids()[4:10]
    for model_id in models:  # warm, and reported to the routers
        assert app.predict(model_id, _rows(0)).status_code == 200
    wait_for(
        lambda: all(
            sum(m["key"] == f"{model_id}@1" for r in app.replicas() for m in r["models"]) == 1
            for model_id in models
        ),
        15,
        "each model to be resident on one replica",
    )
    before = sum(r.get("grouped_calls", 0) for r in app.replicas())
    calls = [(models[i % len(models)], _rows(i)) for i in range(120)]

    bodies = _send_all(app, calls)
    for (model_id, inputs), body in zip(calls, bodies, strict=True):
        assert body["model_id"] == model_id
        assert body["resident"] is True
        assert_same(model_id, body["outputs"], expected(model_id, inputs))

    def grouped() -> int:
        app.predict(models[0], _rows(0))  # counters publish at most once a second
        return sum(r.get("grouped_calls", 0) for r in app.replicas()) - before

    wait_for(lambda: grouped() > 0, 15, "a host to report a call of several models", every_s=0.5)
