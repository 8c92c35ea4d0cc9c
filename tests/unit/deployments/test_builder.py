"""build_app: one deployment per pool, and the routing only in user_configs (the Ingress's
and, for their pins, every host pool's), so a routing change leaves every deployment's init
arguments as they were."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

# NOTE: Serve's own builder flattens an Application into its deployments (what `serve run`
# and `serve deploy` do first); no cluster is needed for that.
from ray.serve._private.build_app import build_app as flatten

from deployments.builder import build_app
from deployments.ray_internals import SERVE_THROUGHPUT_ENV
from serve_app.config import AppConfig

POOLS = [
    {"name": "a", "memory_budget": "1GiB", "autoscaling": {"min_replicas": 1, "max_replicas": 3}},
    {"name": "b", "memory_budget": "2GiB", "num_replicas": 3, "accelerator": "cpu"},
]


def deployments(args: dict[str, Any]) -> dict[str, Any]:
    built = flatten(build_app(AppConfig.model_validate(args)), name="fleet")
    return {d.name: d for d in built.deployments}


def test_one_deployment_per_pool_with_its_own_options() -> None:
    built = deployments({"pools": POOLS})
    assert set(built) == {"ModelHost-a", "ModelHost-b", "Ingress"}
    assert built["ModelHost-a"]._deployment_config.autoscaling_config.max_replicas == 3
    assert built["ModelHost-b"]._deployment_config.num_replicas == 3
    assert set(deployments({})) == {"ModelHost", "Ingress"}  # the default config: unchanged


def test_access_lines_are_written_at_the_ingress_only() -> None:
    built = deployments({"pools": POOLS})
    for host in ("ModelHost-a", "ModelHost-b"):
        assert built[host]._deployment_config.logging_config["enable_access_log"] is False
    ingress_logging = built["Ingress"]._deployment_config.logging_config
    assert ingress_logging is None or ingress_logging["enable_access_log"] is True


def test_routing_changes_only_user_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routing (pins included) is every deployment's user_config: Serve reconfigures
    running replicas when only user_config changes; init args never carry it."""
    monkeypatch.setattr("deployments.builder.check_routing", lambda config: None)  # no store
    first = deployments({"pools": POOLS, "routing": {"pins": []}})
    routing = {
        "rules": [{"pattern": "x-*", "pool": "b"}],
        "sticky_header": "X-Tenant",
        "pins": ["x-1@2", "y"],
    }
    second = deployments({"pools": POOLS, "routing": routing})
    for name in first:
        assert repr(first[name].init_args) == repr(second[name].init_args), name
    assert first["Ingress"]._deployment_config.user_config["sticky_header"] == "X-User-Id"
    assert second["Ingress"]._deployment_config.user_config["sticky_header"] == "X-Tenant"
    for name in ("ModelHost-a", "ModelHost-b"):
        config = second[name]._deployment_config.user_config
        assert config == second["Ingress"]._deployment_config.user_config
        assert config["pins"] == ["x-1@2", "y"]
        assert config["rules"][0]["pattern"] == "x-*"
        assert first[name]._deployment_config.user_config["pins"] == []
        assert second[name].init_args[2] == ["a", "b"]  # the pools pins are placed among


def test_bad_pools_fail_the_build_with_what_to_fix() -> None:
    with pytest.raises(ValidationError, match="pool 'a' has no memory budget"):
        build_app({"pools": [{"name": "a"}]})


def test_cluster_placement_options_reach_the_deployments() -> None:
    built = deployments(
        {
            "host": {"max_replicas_per_node": 1, "resources": {"fleet_gpu": 1}},
            "ingress": {
                "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
                "resources": {"fleet_ingress": 1},
            },
        }
    )
    host, ingress = built["ModelHost"], built["Ingress"]
    assert host._replica_config.max_replicas_per_node == 1
    assert host._replica_config.ray_actor_options["resources"] == {"fleet_gpu": 1}
    scaling = ingress._deployment_config.autoscaling_config
    assert (scaling.max_replicas, scaling.target_ongoing_requests) == (4, 8)
    assert ingress._replica_config.ray_actor_options["resources"] == {"fleet_ingress": 1}
    # without them: Serve's defaults (best-effort spread, no custom resources)
    plain = deployments({})
    assert plain["ModelHost"]._replica_config.max_replicas_per_node is None
    assert "resources" not in plain["Ingress"]._replica_config.ray_actor_options


def test_replicas_get_serves_throughput_settings_unless_configured() -> None:
    built = deployments({"pools": POOLS, "ingress": {"serve_env": {}}})
    for host in ("ModelHost-a", "ModelHost-b"):
        options = built[host].ray_actor_options
        assert options["runtime_env"] == {"env_vars": SERVE_THROUGHPUT_ENV}
    assert "runtime_env" not in built["Ingress"].ray_actor_options  # {}: Serve's defaults
