"""The shipped config.yaml deploys as written and serves a cold, then a warm request.

This is also the smoke test that CI runs on the oldest Ray release of the declared range
(`.ci/ray-oldest`): it needs only the local S3 server, one Ray instance and one small model.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devstack.demo_fleet import FRAUD_FEATURES, write_fraud_model
from serve_app.config import StoreConfig
from serve_app.storage.publisher import publish_path
from serve_app.storage.store import ModelStore
from tests.support import wait_for, wait_healthy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def _fleet_app_of(config_path: Path) -> dict[str, Any]:
    apps = yaml.safe_load(config_path.read_text())["applications"]
    return next(a for a in apps if a["name"] == "fleet")


def test_config_yaml_deploys_and_serves_cold_then_warm(
    serve_url: str, store_config: StoreConfig, tmp_path: Path
) -> None:
    import importlib

    from ray import serve

    spec = _fleet_app_of(ROOT / "config.yaml")
    module, _, attr = spec["import_path"].partition(":")
    build = getattr(importlib.import_module(module), attr)
    # NOTE: as `serve deploy` does: the import path's builder gets the file's `args`; only
    # the store moves to this session's bucket (the endpoint comes from AWS_* as in prod).
    args = dict(spec["args"], store=dict(spec["args"]["store"], url=f"{store_config.url}-cfg"))
    model_id = f"smoke-{uuid.uuid4().hex[:6]}"
    smoke_store = ModelStore(StoreConfig(url=args["store"]["url"]))
    smoke_store.ensure_bucket()
    publish_path(smoke_store, write_fraud_model(tmp_path / model_id, 0), model_id, "1")

    name, prefix = "fleet-config", "/config-smoke"
    serve.run(build(args), name=name, route_prefix=prefix, blocking=False)
    url = f"{serve_url}{prefix}"
    try:
        wait_healthy(url, 240, "the config.yaml app to become healthy")
        wait_for(
            lambda: httpx.get(f"{url}/v1/models/{model_id}", timeout=10).status_code == 200,
            60,
            "the smoke model in the registry",
        )
        body = {"inputs": [[0.1] * FRAUD_FEATURES]}
        cold = httpx.post(f"{url}/v1/models/{model_id}/predict", json=body, timeout=120)
        assert cold.status_code == 200, cold.text
        assert cold.headers["X-Fleet-Cache"] == "miss"
        warm = httpx.post(f"{url}/v1/models/{model_id}/predict", json=body, timeout=60)
        assert warm.status_code == 200, warm.text
        assert warm.headers["X-Fleet-Cache"] == "hit"
        assert warm.json()["outputs"] == cold.json()["outputs"]
        assert warm.json()["model_id"] == model_id
    finally:
        serve.delete(name)
