"""Routing: aliases, versions, default versions, pool rules, pins, and bad configs refused
with a message saying what to fix."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from devstack.demo_fleet import write_fraud_model
from serve_app.config import AppConfig, PoolConfig, RoutingConfig, describe_errors
from serve_app.errors import InvalidModelId, InvalidRouting, ModelNotFound, VersionNotFound
from serve_app.gateway.routing_table import RoutingTable
from serve_app.storage.publisher import publish_path
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore
from tests.support import SMALL

POOLS = [
    PoolConfig(name="default", memory_budget=10**6),
    PoolConfig(name="big", memory_budget=10**7),
]


@pytest.fixture
def registry(published: ModelStore, tmp_path: Path) -> Registry:
    src = write_fraud_model(tmp_path / "tagged", 0, 9, SMALL)
    publish_path(published, src, "tagged-model", "1", tags=["gpu", "team-x"])
    registry = Registry(published, refresh_s=60)
    registry.refresh()
    return registry


def table(registry: Registry, **routing: Any) -> RoutingTable:
    return RoutingTable(RoutingConfig.model_validate(routing), POOLS, registry)


AB = {"ab": {"arms": [{"target": "m-a@1", "weight": 90}, {"target": "m-a@2", "weight": 10}]}}


def test_versions_default_and_at_syntax(registry: Registry) -> None:
    routes = table(registry, default_versions={"m-a": "1"})
    assert routes.resolve("m-a").manifest.key == "m-a@1"  # the configured default
    assert routes.resolve("m-a@2").manifest.key == "m-a@2"
    assert routes.resolve("m-a", "2").manifest.key == "m-a@2"
    assert table(registry).resolve("m-a").manifest.key == "m-a@2"  # latest
    with pytest.raises(VersionNotFound):
        routes.resolve("m-a@9")
    with pytest.raises(ModelNotFound):
        routes.resolve("nope@1")
    with pytest.raises(InvalidModelId):
        routes.resolve("../x@1")
    with pytest.raises(InvalidRouting, match="names version"):
        routes.resolve("m-a@1", "2")


def test_alias_split_sticky_and_explicit_version_bypasses_it(registry: Registry) -> None:
    routes = table(registry, aliases=AB)
    route = routes.resolve("ab", key="user-1")
    assert route.alias == "ab"
    assert route.arm in {"m-a@1", "m-a@2"}
    assert all(routes.resolve("ab", key="user-1").arm == route.arm for _ in range(50))
    counts = Counter(routes.resolve("ab").arm for _ in range(10_000))
    assert abs(counts["m-a@1"] / 100 - 90) <= 1.5, counts
    assert routes.resolve("m-a@1").alias is None
    assert routes.sticky_header("ab") == "X-User-Id"
    assert routes.sticky_header("m-a") is None


def test_alias_named_like_a_model_and_shadow(registry: Registry) -> None:
    routes = table(
        registry,
        aliases={
            "m-a": {
                "arms": [{"target": "m-a@1", "weight": 100}],
                "shadow": {"target": "m-b"},
                "sticky_header": "X-Tenant",
            }
        },
    )
    route = routes.resolve("m-a")
    assert (route.manifest.key, route.shadow.key) == ("m-a@1", "m-b@1")
    assert routes.resolve("m-a@2").shadow is None  # an explicit version is not the alias
    assert routes.sticky_header("m-a") == "X-Tenant"


def test_pool_rules_by_pattern_and_tag_first_match_wins(registry: Registry) -> None:
    routes = table(
        registry, rules=[{"pattern": "m-b*", "pool": "big"}, {"tag": "gpu", "pool": "big"}]
    )
    assert routes.resolve("m-b").pool == "big"
    assert routes.resolve("tagged-model").pool == "big"
    assert routes.resolve("m-a").pool == "default"  # no rule: the first pool


def test_pins_by_pool_aliases_pin_all_arms(registry: Registry) -> None:
    routes = table(
        registry, aliases=AB, pins=["ab", "m-b"], rules=[{"pattern": "m-b", "pool": "big"}]
    )
    pins = {pool: sorted(m.key for m in ms) for pool, ms in routes.pins_by_pool().items()}
    assert pins == {"default": ["m-a@1", "m-a@2"], "big": ["m-b@1"]}


@pytest.mark.parametrize(
    ("routing", "fix"),
    [
        (
            {
                "aliases": {
                    "ab": {
                        "arms": [
                            {"target": "m-a@1", "weight": 80},
                            {"target": "m-a@2", "weight": 15},
                        ]
                    }
                }
            },
            "arm weights add up to 95, not 100: change them so they sum to 100",
        ),
        (
            {"aliases": {"ab": {"arms": [{"target": "rankr@1", "weight": 100}]}}},
            "alias 'ab' arm 'rankr@1' points at an unknown model or version: "
            "model 'rankr' is not published",
        ),
        (
            {"aliases": {"ab": {"arms": [{"target": "m-a@7", "weight": 100}]}}},
            "model 'm-a' has no version '7'",
        ),
        (
            {"rules": [{"pattern": "fraud-*", "pool": "gpu"}]},
            "rules[0] (fraud-*) sends models to pool 'gpu', which is not declared; "
            "declared pools: default, big",
        ),
        ({"pins": ["nope"]}, "pin 'nope' points at an unknown model"),
        ({"rules": [{"pool": "big"}]}, "needs exactly one of pattern or tag"),
    ],
)
def test_bad_routing_is_refused_with_what_to_fix(
    registry: Registry, routing: dict[str, Any], fix: str
) -> None:
    with pytest.raises((InvalidRouting, ValidationError)) as caught:
        table(registry, **routing)
    error = caught.value
    message = describe_errors(error) if isinstance(error, ValidationError) else error.message
    assert fix in message


def test_pins_that_do_not_fit_the_pool_budget_are_refused(registry: Registry) -> None:
    manifest = registry.resolve("m-a", "1")
    pools = [PoolConfig(name="default", memory_budget=manifest.total_bytes + 1)]
    config = RoutingConfig(pins=["m-a@1", "m-a@2"])
    with pytest.raises(
        InvalidRouting, match=r"pins for pool 'default' need .* more than its memory budget"
    ):
        RoutingTable(config, pools, registry)
    RoutingTable(RoutingConfig(pins=["m-a@1"]), pools, registry)  # one fits
    # the cache reserves every file's bytes for a pin, not just the weights': so does this
    assert manifest.weight_bytes < manifest.total_bytes
    tight = [PoolConfig(name="default", memory_budget=manifest.weight_bytes + 1)]
    with pytest.raises(InvalidRouting):
        RoutingTable(RoutingConfig(pins=["m-a@1"]), tight, registry)


def test_app_config_rejects_pool_without_budget_and_rules_to_unknown_pools() -> None:
    with pytest.raises(
        ValidationError, match="pool 'small' has no memory budget: set memory_budget"
    ):
        AppConfig.model_validate({"pools": [{"name": "small"}]})
    with pytest.raises(ValidationError, match="memory_budget"):
        AppConfig.model_validate({"pools": [{"name": "small", "memory_budget": 0}]})
    with pytest.raises(ValidationError, match="sends models to pool 'gpu', which is not declared"):
        AppConfig.model_validate(
            {
                "pools": [{"name": "small", "memory_budget": "1GiB"}],
                "routing": {"rules": [{"pattern": "x*", "pool": "gpu"}]},
            }
        )
    with pytest.raises(ValidationError, match="either host"):
        AppConfig.model_validate({"host": {}, "pools": [{"name": "a", "memory_budget": 1}]})
    with pytest.raises(ValidationError, match="unique"):
        AppConfig.model_validate(
            {"pools": [{"name": "a", "memory_budget": 1}, {"name": "a", "memory_budget": 1}]}
        )


def test_default_config_is_one_default_pool() -> None:
    (pool,) = AppConfig().pool_configs()
    assert (pool.name, pool.deployment_name) == ("default", "ModelHost")
    assert PoolConfig(name="big", memory_budget=1).deployment_name == "ModelHost-big"
