"""Hot-model copies on real Ray Serve: one hot model among cold ones gets a second copy,
both copies serve a fair share of its traffic, and the copy goes once the model cools.

A second application (`fleet-hot`, route prefix /hot: two host replicas, one ingress
replica, `host.hot_copies` with low thresholds) runs beside the session's `fleet` app and
serves the session's fraud models from the same S3.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest

from serve_app.config import AppConfig, StoreConfig
from tests.integration.reference import inputs_for
from tests.support import FleetApp, Traffic, copy_holders, fraud_ids, wait_for, wait_healthy

pytestmark = pytest.mark.integration

APP = "fleet-hot"
HOT_COPIES = {"max_copies": 2, "rate_per_s": 3.0, "window_s": 3.0, "cool_after_s": 3.0}


@pytest.fixture(scope="module")
def hot_app(app: FleetApp, store_config: StoreConfig) -> Iterator[FleetApp]:
    from ray import serve

    from deployments.builder import build_app

    config = AppConfig.model_validate(
        {
            "store": store_config.model_dump(),
            "host": {
                "num_replicas": 2,
                "num_cpus": 0.25,
                "accelerator": "cpu",
                "memory_budget": 40 * 10**6,
                "load_timeout_s": 60,
                "disk_cache_bytes": "200MB",
                "hot_copies": HOT_COPIES,
            },
            "ingress": {**app.config.ingress.model_dump(), "num_cpus": 0.1},
        }
    )
    serve.run(build_app(config), name=APP, route_prefix="/hot", blocking=False)
    hot = FleetApp(f"{app.url}/hot", config)
    wait_healthy(hot.url, 180, "the hot-copies app to become healthy")
    wait_for(lambda: len(hot.replicas()) == 2, 60, "its two host replicas")
    yield hot
    serve.delete(APP)


def holders(app: FleetApp, key: str) -> dict[str, bool]:
    return copy_holders(app.replicas(), key)


def test_a_hot_model_gets_a_copy_that_shares_its_traffic_and_goes_when_cool(
    hot_app: FleetApp,
) -> None:
    ids = fraud_ids()
    hot, cold = ids[30], ids[31:39]
    key = f"{hot}@1"
    # NOTE: the hot model is warm on one replica first: a burst of concurrent first requests
    # can load a cold model twice when the replicas' routing stats change between the
    # router's choices (see the branch report), which would leave no copy to make.
    assert hot_app.predict(hot, inputs_for(hot)).status_code == 200
    wait_for(lambda: len(holders(hot_app, key)) == 1, 30, "the hot model on one replica")
    with Traffic(hot_app.url, cold, inputs_for, threads=1, pause_s=0.2) as background:
        with Traffic(hot_app.url, [hot], inputs_for, threads=4, pause_s=0.0) as traffic:
            try:
                copies = wait_for(
                    lambda: (h := holders(hot_app, key)) and len(h) == 2 and any(h.values()) and h,
                    60,
                    "a second copy of the hot model",
                )
            except AssertionError as exc:
                seen = Counter(r for _, m, r in traffic.served if m == hot)
                models = {r["replica"]: r["models"] for r in hot_app.replicas()}
                raise AssertionError(f"{exc}; served by {seen}, replicas hold {models}") from None
            started = time.monotonic()
            wait_for(lambda: time.monotonic() - started > 8, 20, "8 s of hot traffic")
        measured = [r for at, _, r in traffic.served if at >= started]
        shares = {r: 100 * n / len(measured) for r, n in Counter(measured).items()}
        cooled_at = time.monotonic()
        # cooled: a trickle (well under rate_per_s) goes on; the copy is dropped
        with Traffic(hot_app.url, [hot], inputs_for, threads=1, pause_s=1.0) as trickle:
            wait_for(lambda: len(holders(hot_app, key)) == 1, 60, "the copy to go")
            gone_s = time.monotonic() - cooled_at
    (primary,) = holders(hot_app, key).values()
    assert primary is False  # the copy went, the first holder stayed
    assert set(shares) == set(copies), shares
    for replica, share in shares.items():
        assert abs(share - 50) <= 15, (replica, shares)
    for t in (traffic, background, trickle):
        assert set(t.statuses) == {200}, t.statuses
    print(
        f"\nhot copies: {len(measured)} hot requests in 8 s over {len(shares)} copies, "
        f"shares {', '.join(f'{s:.1f}%' for s in sorted(shares.values()))}; "
        f"copy dropped {gone_s:.1f}s after the model cooled "
        f"(window {HOT_COPIES['window_s']:g}s + cool_after {HOT_COPIES['cool_after_s']:g}s)"
    )
