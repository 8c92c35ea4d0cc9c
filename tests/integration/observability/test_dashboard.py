"""The Ray dashboard shows the fleet app and both deployments healthy (via its REST API)."""

from __future__ import annotations

from typing import Any

import httpx

from devstack.ray_head import ray_auth_headers
from tests.support import FleetApp, wait_for


def test_dashboard_shows_fleet_healthy(app: FleetApp, ray_cluster: dict[str, Any]) -> None:
    url = f"{ray_cluster['dashboard_url']}/api/serve/applications/"
    # token authentication is on: without the token the dashboard refuses
    assert httpx.get(url, timeout=30).status_code in (401, 403)

    def fleet_details() -> dict[str, Any] | None:
        response = httpx.get(url, headers=ray_auth_headers(), timeout=30)
        if response.status_code != 200:
            return None
        fleet = response.json()["applications"].get("fleet")
        return fleet if fleet and fleet["status"] == "RUNNING" else None

    fleet = wait_for(fleet_details, 60, "the dashboard to report the fleet app", every_s=0.5)
    assert fleet["route_prefix"] == "/"
    deployments = fleet["deployments"]
    assert set(deployments) == {"Ingress", "ModelHost"}
    for name, deployment in deployments.items():
        assert deployment["status"] == "HEALTHY", name
        running = [r for r in deployment["replicas"] if r["state"] == "RUNNING"]
        assert len(running) == deployment["target_num_replicas"], name
    assert deployments["ModelHost"]["target_num_replicas"] == 2
