"""Cluster fixtures: a real local multi-node Ray cluster (head + 2 worker nodes, each its own
raylet on its own loopback address, token auth), a real SeaweedFS, the `fleet` app on it.

Run in their own pytest session (`make test-cluster`): the default session already holds a
single-node Ray instance. Everything started here is stopped here, by pid."""

from __future__ import annotations

import os
import secrets

# NOTE: Ray reads its auth settings when it is imported, so this session's token is set
# before anything imports ray (tests/conftest.py collects this folder only in a session of
# its own, `-m cluster`, so no other Ray instance shares the process).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.demo_fleet import publish_demo_fleet
from devstack.ports import find_free_ports
from devstack.ray_head import RayHead, forget_ray_address
from devstack.seaweed import SeaweedServer
from devstack.state import load_state
from devstack.workers import ensure_workers, node_env, stop_workers
from serve_app.config import AppConfig, StoreConfig
from serve_app.storage.manifest import Manifest
from serve_app.storage.store import ModelStore, wait_for_store
from tests.cluster.harness import App, Cluster
from tests.support import ADMIN_KEY, running_seaweed, wait_for, wait_healthy

WORKERS = 2
FLEET = 16  # small fraud models: loads take well under a second
PINNED = "fraud-merchant-0000"
LOAD_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    with running_seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(scope="session")
def store_config(s3: SeaweedServer) -> StoreConfig:
    return StoreConfig(url=f"s3://fleet/cluster-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def fleet(store_config: StoreConfig) -> dict[str, Manifest]:
    store = ModelStore(store_config)
    wait_for_store(store)
    manifests = publish_demo_fleet(
        store, FLEET, progress=False, classifiers=(), include_embedder=False, vision=0
    )
    return {m.model_id: m for m in manifests}


@pytest.fixture(scope="session")
def cluster(s3: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Ray head + WORKERS worker nodes, started with the local stack's own code."""
    state_dir: Path = tmp_path_factory.mktemp("stack")
    env = node_env(s3.env())
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    gcs, dashboard, metrics = find_free_ports(3)
    head = RayHead(state_dir / "logs" / "ray-head.log", env, gcs, dashboard, metrics)
    state: dict = {}
    started = time.monotonic()
    head.start()
    try:
        head.wait_ready()
        head_s = time.monotonic() - started
        began = time.monotonic()
        workers = ensure_workers(
            state_dir, state, WORKERS, head.gcs_address, env, 2.0, head.dashboard_url
        )
        built = Cluster(
            head, workers, state_dir, {"head": head_s, "workers": time.monotonic() - began}
        )
        print(f"\ncluster: head + {WORKERS} workers, start times (s) {built.start_s}")
        yield built
    finally:
        stop_workers(state_dir, load_state(state_dir))
        head.stop()
        forget_ray_address(head.gcs_address)


@pytest.fixture(scope="session")
def app_config(store_config: StoreConfig) -> AppConfig:
    return AppConfig.model_validate(
        {
            "store": store_config.model_dump(),
            "host": {
                "num_replicas": 2,
                "num_cpus": 0.5,
                "accelerator": "cpu",
                "memory_budget": "256MB",
                "failure_ttl_s": 2,
                "load_timeout_s": LOAD_TIMEOUT_S,
                "max_replicas_per_node": 1,
            },
            "ingress": {
                "num_cpus": 0.25,
                "management": {"admin_key": ADMIN_KEY},
                "registry_refresh_s": 1.0,
                # NOTE: the head stands in for the CPU nodes (Ray's own node-IP resource);
                # the hosts spread over all three nodes, one per node at most.
                "resources": {"node:127.0.0.1": 0.01},
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 2,
                    "upscale_delay_s": 1,
                    "downscale_delay_s": 600,
                },
            },
            "routing": {"pins": [PINNED]},
        }
    )


@pytest.fixture(scope="session")
def app(cluster: Cluster, app_config: AppConfig, fleet: dict[str, Manifest]) -> Iterator[App]:
    """The `fleet` app deployed on the cluster from a driver connected to its head."""
    import ray
    from ray import serve

    from deployments.builder import build_app

    ray.init(address=cluster.head.gcs_address)
    (port,) = find_free_ports(1)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_config), name="fleet", route_prefix="/", blocking=False)
    fleet_app = App(f"http://127.0.0.1:{port}")
    try:
        wait_healthy(fleet_app.url, 240, "the fleet app on the cluster")
        wait_for(lambda: len(fleet_app.replicas()) == 2, 120, "2 host replicas", every_s=0.5)
        yield fleet_app
    finally:
        serve.shutdown()
        ray.shutdown()
