"""Working-set autoscaling (issue 14 §3), the scenario its single-node test
(tests/integration/host/test_working_set_autoscaling.py) and its cluster test
(tests/cluster/test_cluster.py) share.

A second application (`fleet-ws`, route prefix /ws: one pool `bytes`, autoscaling 1-4
replicas with `autoscale_on_working_set`, short windows and delays) runs beside the
session's `fleet` app and serves fraud models from the same S3. One closed-loop client
cycles over a working set 3x one replica's budget (the pool scales up on bytes; hit rate
measured before and after), then over two models (it scales back down). Every 200 is
checked against the reference outputs (the model rebuilt and run directly with torch).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from serve_app.config import AppConfig, StoreConfig
from tests.integration.reference import assert_same, expected, inputs_for
from tests.support import wait_for, wait_healthy

APP = "fleet-ws"
DEPLOYMENT = "ModelHost-bytes"
PEAK = 4  # 3x the budget at target_fill 0.75: ceil(3 / 0.75) replicas
BUDGETS = 3  # the large working set, in replica budgets


def working_set_config(
    store: StoreConfig, ingress: dict[str, Any], working_set_bytes: int, **pool: Any
) -> AppConfig:
    """The `fleet-ws` app: one replica's budget is a third of `working_set_bytes`; `pool`
    adds or overrides pool options (e.g. `max_replicas_per_node`)."""
    return AppConfig.model_validate(
        {
            "store": store.model_dump(),
            "pools": [
                {
                    "name": "bytes",
                    "num_cpus": 0.25,
                    "accelerator": "cpu",
                    "memory_budget": math.ceil(working_set_bytes / BUDGETS),
                    "load_timeout_s": 60,
                    "disk_cache_bytes": "200MB",
                    "autoscaling": {
                        "min_replicas": 1,
                        "initial_replicas": 1,
                        "max_replicas": PEAK,
                        "target_ongoing_requests": 50,  # load alone never scales this pool
                        "metrics_interval_s": 0.5,
                        "look_back_period_s": 2,
                        "upscale_delay_s": 1,
                        "downscale_delay_s": 2,
                    },
                    "autoscale_on_working_set": {"window_s": 8, "target_fill": 0.75},
                    **pool,
                }
            ],
            "ingress": {**ingress, "num_cpus": 0.1},
        }
    )


@contextlib.contextmanager
def deployed(config: AppConfig, base_url: str) -> Iterator[str]:
    """`fleet-ws` deployed beside the session's app (same Serve instance); its URL."""
    from ray import serve

    from deployments.builder import build_app

    serve.run(build_app(config), name=APP, route_prefix="/ws", blocking=False)
    try:
        url = f"{base_url}/ws"
        wait_healthy(url, 180, "the working-set app to become healthy")
        yield url
    finally:
        serve.delete(APP)


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments[DEPLOYMENT]
    return int(deployment.replica_states.get("RUNNING", 0))


@functools.cache
def _reference(model_id: str) -> tuple[list[Any], list[Any]]:
    inputs = inputs_for(model_id)
    return inputs, expected(model_id, inputs)


@dataclass
class WorkingSetRun:
    """What one run of the scenario measured (times in seconds since its start)."""

    started: float = field(default_factory=time.monotonic)
    statuses: Counter[int] = field(default_factory=Counter)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (t, running replicas)
    served: list[tuple[float, str, str]] = field(default_factory=list)  # (t, model, replica)
    before: tuple[int, int] = (0, 0)  # (hits, requests) on one replica
    after: tuple[int, int] = (0, 0)  # (hits, requests) at the peak, once settled
    after_from: float = 0.0  # when the measured peak phase began
    up_s: float = 0.0  # when the pool reached PEAK replicas
    down_s: float = 0.0  # when it was back to one

    def since_start(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def drive(self, url: str, models: list[str], seconds: float) -> tuple[int, int]:
        """Cycle over `models` for `seconds`, one request at a time; (hits, requests)."""
        hits = requests = 0
        end = time.monotonic() + seconds
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < end:
                for model_id in models:
                    inputs, want = _reference(model_id)
                    response = client.post(
                        f"{url}/v1/models/{model_id}/predict", json={"inputs": inputs}
                    )
                    self.statuses[response.status_code] += 1
                    requests += 1
                    if response.status_code == 200:
                        body = response.json()
                        assert_same(model_id, body["outputs"], want)
                        hits += bool(body["resident"])
                        self.served.append((self.since_start(), model_id, body["replica"]))
                self.timeline.append((self.since_start(), running_replicas()))
        return hits, requests

    def rates(self) -> tuple[float, float]:
        return self.before[0] / self.before[1], self.after[0] / self.after[1]

    def summary(self) -> str:
        rate_before, rate_after = self.rates()
        step = max(1, len(self.timeline) // 12)
        return (
            f"hit rate {rate_before:.0%} on 1 replica -> {rate_after:.0%} on {PEAK}; "
            f"{PEAK} replicas at {self.up_s}s, back to 1 at {self.down_s}s; replicas over "
            f"time {self.timeline[::step]}; statuses {dict(self.statuses)}"
        )


def scale_up_and_down(
    url: str,
    models: list[str],
    small: list[str],
    at_peak: Callable[[WorkingSetRun], None] | None = None,
) -> WorkingSetRun:
    """The trace: `models` (the large working set) on one replica, until the pool reaches
    PEAK replicas, settled, measured; `at_peak(run)` while it is there; then `small` until
    it is back to one replica. Checks every request got 200 and the hit rate rose."""
    run = WorkingSetRun()
    assert running_replicas() == 1
    run.before = run.drive(url, models, 6)  # one replica: the working set does not fit
    wait_for(
        lambda: run.drive(url, models, 1) and running_replicas() == PEAK, 90, f"{PEAK} replicas"
    )
    run.up_s = run.since_start()
    run.drive(url, models, 4)  # let the models settle on their replicas
    run.after_from = run.since_start()
    run.after = run.drive(url, models, 6)
    if at_peak is not None:
        at_peak(run)
    wait_for(lambda: run.drive(url, small, 1) and running_replicas() == 1, 90, "back to 1")
    run.down_s = run.since_start()
    run.drive(url, small, 2)
    rate_before, rate_after = run.rates()
    assert set(run.statuses) == {200}, run.statuses
    assert rate_after >= 0.8, (run.before, run.after)  # PEAK budgets hold the working set
    assert rate_after > rate_before + 0.3, (run.before, run.after)
    return run
