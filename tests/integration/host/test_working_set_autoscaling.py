"""Working-set autoscaling on real Ray Serve: a trace whose working set is ~3x one
replica's budget scales the pool up through Serve's custom autoscaling policy (hit rate
measured before and after), and when the working set shrinks the pool scales back down
without a failed request.

A second application (`fleet-ws`, route prefix /ws: one pool `bytes`, autoscaling 1-4
replicas with `autoscale_on_working_set`, short windows and delays) runs beside the
session's `fleet` app and serves the session's fraud models from the same S3.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from serve_app.config import AppConfig, StoreConfig
from serve_app.storage.manifest import Manifest
from tests.integration.reference import inputs_for
from tests.support import FleetApp, fraud_ids, wait_for, wait_healthy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = "fleet-ws"
DEPLOYMENT = "ModelHost-bytes"
MODELS = fraud_ids()[20:29]  # nine models: the large working set
SMALL = MODELS[:2]  # the small one


def running_replicas() -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    deployment = serve.status().applications[APP].deployments[DEPLOYMENT]
    return deployment.replica_states.get(ReplicaState.RUNNING, 0)


@pytest.fixture(scope="module")
def ws_app(app: FleetApp, store_config: StoreConfig, fleet: dict[str, Manifest]) -> Iterator[Any]:
    from ray import serve

    from deployments.builder import build_app

    total = sum(fleet[f"{m}@1"].total_bytes for m in MODELS)
    budget = math.ceil(total / 3)  # the working set is 3x one replica's budget
    config = AppConfig.model_validate(
        {
            "store": store_config.model_dump(),
            "pools": [
                {
                    "name": "bytes",
                    "num_cpus": 0.25,
                    "accelerator": "cpu",
                    "memory_budget": budget,
                    "load_timeout_s": 60,
                    "disk_cache_bytes": "200MB",
                    "autoscaling": {
                        "min_replicas": 1,
                        "initial_replicas": 1,
                        "max_replicas": 4,
                        "target_ongoing_requests": 50,  # load alone never scales this pool
                        "metrics_interval_s": 0.5,
                        "look_back_period_s": 2,
                        "upscale_delay_s": 1,
                        "downscale_delay_s": 2,
                    },
                    "autoscale_on_working_set": {"window_s": 8, "target_fill": 0.75},
                }
            ],
            "ingress": {**app.config.ingress.model_dump(), "num_cpus": 0.1},
        }
    )
    serve.run(build_app(config), name=APP, route_prefix="/ws", blocking=False)
    ws = FleetApp(f"{app.url}/ws", config)
    wait_healthy(ws.url, 180, "the working-set app to become healthy")
    yield ws, budget, total
    serve.delete(APP)


def test_working_set_scales_the_pool_up_and_back_down(ws_app: Any) -> None:
    app, budget, total = ws_app
    statuses: dict[int, int] = {}
    timeline: list[tuple[float, int]] = []
    started = time.monotonic()

    def run(models: list[str], seconds: float) -> tuple[int, int]:
        """Cycle over `models` for `seconds`; returns (hits, requests)."""
        hits = requests = 0
        end = time.monotonic() + seconds
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < end:
                for model_id in models:
                    response = client.post(
                        f"{app.url}/v1/models/{model_id}/predict",
                        json={"inputs": inputs_for(model_id)},
                    )
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    requests += 1
                    hits += response.status_code == 200 and response.json()["resident"]
                timeline.append((round(time.monotonic() - started, 1), running_replicas()))
        return hits, requests

    assert running_replicas() == 1
    before = run(MODELS, 6)  # one replica: the working set does not fit, it thrashes
    # 3x the budget at target_fill 0.75: 4 replicas
    wait_for(lambda: run(MODELS, 1) and running_replicas() == 4, 90, "4 replicas")
    run(MODELS, 4)  # let the models settle on their replicas
    after = run(MODELS, 6)
    wait_for(lambda: run(SMALL, 1) and running_replicas() == 1, 90, "back to 1 replica")
    run(SMALL, 2)
    rate_before, rate_after = before[0] / before[1], after[0] / after[1]
    print(
        f"\nworking set {total / 1e6:.1f} MB = {total / budget:.1f}x a {budget / 1e6:.1f} MB "
        f"budget; hit rate {rate_before:.0%} on 1 replica -> {rate_after:.0%} on 4; "
        f"replicas over time {timeline[:: max(1, len(timeline) // 12)]}; statuses {statuses}"
    )
    assert set(statuses) == {200}, statuses
    assert rate_after >= 0.8, (before, after)  # 4 budgets hold the working set
    assert rate_after > rate_before + 0.3, (before, after)
