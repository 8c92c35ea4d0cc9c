"""Integration fixtures: one real SeaweedFS, one Ray instance, one `fleet` app per session.

The fleet published for the session is at least 3x one replica's memory budget, so the
churn test forces evictions. Everything started here is stopped here."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devstack.demo_fleet import publish_demo_fleet
from devstack.seaweed import SeaweedServer, find_free_port
from serve_app.config import AppConfig, StoreConfig
from serve_app.storage.manifest import Manifest
from serve_app.storage.store import ModelStore, wait_for_store
from tests.support import (
    ADMIN_KEY,
    BUDGET,
    CLASSIFIERS,
    FRAUD_COUNT,
    FleetApp,
    running_seaweed,
    wait_for,
    wait_healthy,
)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A real SeaweedFS S3 server on 127.0.0.1 with keys; AWS_* env points at it."""
    with running_seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(scope="session")
def store_config(s3: SeaweedServer) -> StoreConfig:
    return StoreConfig(url=f"s3://fleet/it-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def store(store_config: StoreConfig) -> ModelStore:
    store = ModelStore(store_config)
    wait_for_store(store)
    return store


@pytest.fixture(scope="session")
def fleet(store: ModelStore) -> dict[str, Manifest]:
    """The session's fleet by `model_id@version`: minilm-embed v1 and v2, 3 text
    classifiers, 40 fraud models."""
    manifests = publish_demo_fleet(
        store, FRAUD_COUNT, progress=False, classifiers=CLASSIFIERS, vision=0
    )
    by_key = {m.key: m for m in manifests}
    # a second version of the embedder: same weights, its own cache key and ~91 MB
    from devstack.demo_fleet import minilm_dir
    from serve_app.storage.publisher import publish_path

    v2 = publish_path(store, minilm_dir(), "minilm-embed", "2", description="same weights, v2")
    by_key[v2.key] = v2
    total = sum(m.weight_bytes for m in by_key.values())
    assert total >= 3 * BUDGET, f"fleet {total / 1e6:.0f} MB is not 3x the budget"
    return by_key


@pytest.fixture(scope="session")
def ray_cluster(s3: SeaweedServer) -> Iterator[dict[str, Any]]:
    """One local Ray instance for the session (replicas inherit the AWS_* env), with its
    dashboard and metrics endpoint on free loopback ports (`dashboard_url`,
    `metrics_export_port` in the returned address info)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="fleet-ray-")
    dashboard_port, metrics_port = find_free_port(), find_free_port()
    context = ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=8,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        _metrics_export_port=metrics_port,
        _temp_dir=temp_dir,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield dict(context.address_info, dashboard_url=f"http://127.0.0.1:{dashboard_port}")
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def serve_url(ray_cluster: dict[str, Any]) -> str:
    """Serve's HTTP proxy, started once for the session on a free loopback port."""
    from ray import serve

    port = find_free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def app(serve_url: str, store_config: StoreConfig, fleet: dict[str, Manifest]) -> FleetApp:
    """The `fleet` app on real Ray Serve: 2 host replicas of BUDGET bytes each."""
    from ray import serve

    from deployments.builder import build_app

    config = AppConfig.model_validate(
        {
            "store": store_config.model_dump(),
            "host": {
                "num_replicas": 2,
                "num_cpus": 0.5,
                "accelerator": "cpu",
                "memory_budget": BUDGET,
                "failure_ttl_s": 3,
                "load_timeout_s": 60,
                "disk_cache_bytes": "600MB",
            },
            "ingress": {
                "num_cpus": 0.25,
                "registry_refresh_s": 1.0,
                "max_body_bytes": "256KiB",
                "management": {"admin_key": ADMIN_KEY},
            },
        }
    )
    serve.run(build_app(config), name="fleet", route_prefix="/", blocking=False)
    url = serve_url

    wait_healthy(url, 180, "the fleet app to become healthy")
    wait_for(lambda: len(FleetApp(url, config).replicas()) == 2, 60, "2 host replicas")
    return FleetApp(url, config)
