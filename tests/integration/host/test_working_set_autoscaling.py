"""Working-set autoscaling on real Ray Serve, one node: a trace whose working set is ~3x one
replica's budget scales the pool up through Serve's custom autoscaling policy (hit rate
measured before and after), and when the working set shrinks the pool scales back down
without a failed request. The app and the trace are in tests/working_set.py (the cluster
test runs the same scenario across nodes); here it serves the session's fraud models.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from serve_app.config import StoreConfig
from serve_app.storage.manifest import Manifest
from tests.support import FleetApp, fraud_ids
from tests.working_set import deployed, scale_up_and_down, working_set_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODELS = fraud_ids()[20:29]  # nine models: the large working set
SMALL = MODELS[:2]  # the small one


@pytest.fixture(scope="module")
def ws_url(
    app: FleetApp, store_config: StoreConfig, fleet: dict[str, Manifest]
) -> Iterator[tuple[str, int]]:
    total = sum(fleet[f"{m}@1"].total_bytes for m in MODELS)
    config = working_set_config(store_config, app.config.ingress.model_dump(), total)
    with deployed(config, app.url) as url:
        yield url, total


def test_working_set_scales_the_pool_up_and_back_down(ws_url: tuple[str, int]) -> None:
    url, total = ws_url
    run = scale_up_and_down(url, MODELS, SMALL)
    print(f"\nworking set {total / 1e6:.1f} MB = 3x the budget; {run.summary()}")
