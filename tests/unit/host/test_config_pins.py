"""Config pins of a pool (`serve_app.host.config_pins`), what a model-host replica's
`reconfigure()` applies: the routing's pins resolved from the store (no registry), placed by
the routing's rules, following the latest version, refused like the Ingress refuses them, and
resident on the host once applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devstack.demo_fleet import write_fraud_model
from serve_app.config import RoutingConfig
from serve_app.errors import StorageUnavailable
from serve_app.gateway.routing_table import PinTarget, pin_targets
from serve_app.host.config_pins import ConfigPins
from serve_app.host.model_host import ModelHost
from serve_app.storage.publisher import publish_path
from serve_app.storage.store import ModelStore
from tests.support import SMALL

POOLS = ["tabular", "text"]
SPLIT = {"arms": [{"target": "m-a@1", "weight": 90}, {"target": "m-b", "weight": 10}]}


def keys(manifests: list[Any] | None) -> list[str] | None:
    return None if manifests is None else sorted(m.key for m in manifests)


def test_pin_targets_expand_aliases_and_apply_default_versions() -> None:
    routing = RoutingConfig.model_validate(
        {
            "aliases": {"ab": SPLIT},
            "default_versions": {"m-b": "1", "m-c": "4"},
            "pins": ["ab", "m-c", "m-a", "m-a@1"],
        }
    )
    assert pin_targets(routing) == [
        PinTarget("m-a", "1"),
        PinTarget("m-b", "1"),
        PinTarget("m-c", "4"),
        PinTarget("m-a", None),
    ]


def test_pins_follow_the_latest_version(published: ModelStore, tmp_path: Path) -> None:
    pins = ConfigPins(published, "tabular", POOLS)
    assert keys(pins.configure({"pins": ["m-a", "m-b@1"]})) == ["m-a@2", "m-b@1"]
    assert pins.needs_refresh  # m-a follows its latest version
    publish_path(published, write_fraud_model(tmp_path / "a3", 0, 5, SMALL), "m-a", "3")
    assert keys(pins.refresh()) == ["m-a@3", "m-b@1"]
    assert pins.errors == {}
    fixed = ConfigPins(published, "tabular", POOLS)
    fixed.configure({"pins": ["m-a@1"]})
    assert not fixed.needs_refresh  # a resolved, versioned pin never changes


def test_a_version_being_published_is_not_the_latest(published: ModelStore) -> None:
    # NOTE: a publisher claims a version first and writes its manifest last
    published.fs.pipe_file(f"{published.root}/m-a/9/.claim", b"{}")
    published.fs.pipe_file(f"{published.root}/m-a/10/model.safetensors", b"partial")
    pins = ConfigPins(published, "tabular", POOLS)
    assert keys(pins.configure({"pins": ["m-a"]})) == ["m-a@2"]
    assert pins.versions("m-a") == ["1", "2"]
    assert pins.versions("m") == []  # a prefix of another model's id is not that model


def test_rules_place_pins_by_id_glob_and_by_tag(published: ModelStore, tmp_path: Path) -> None:
    src = write_fraud_model(tmp_path / "tagged", 0, 7, SMALL)
    publish_path(published, src, "tagged", "1", tags=["pool-text"])
    routing = {
        "rules": [{"pattern": "m-b*", "pool": "text"}, {"tag": "pool-text", "pool": "text"}],
        "pins": ["m-a", "m-b", "tagged"],
    }
    tabular = ConfigPins(published, "tabular", POOLS)
    text = ConfigPins(published, "text", POOLS)
    assert keys(tabular.configure(routing)) == ["m-a@2"]  # unmatched: the first pool
    assert keys(text.configure(routing)) == ["m-b@1", "tagged@1"]


def test_an_alias_pin_pins_every_arm(published: ModelStore) -> None:
    pins = ConfigPins(published, "tabular", POOLS)
    assert keys(pins.configure({"aliases": {"ab": SPLIT}, "pins": ["ab"]})) == ["m-a@1", "m-b@1"]


@pytest.mark.parametrize(
    "bad",
    [
        {"aliases": {"ab": {"arms": [{"target": "m-a@1", "weight": 80}]}}, "pins": ["ab"]},
        {"rules": [{"pattern": "m-*", "pool": "nowhere"}], "pins": ["m-a"]},
        {"pins": ["../etc"]},
        {"pins": ["m-a", "m-nope"]},
        {"pins": ["m-a@7"]},
        {"pins": "m-a"},
    ],
)
def test_a_refused_routing_keeps_the_pins(published: ModelStore, bad: dict[str, Any]) -> None:
    pins = ConfigPins(published, "tabular", POOLS)
    assert keys(pins.configure({"pins": ["m-b"]})) == ["m-b@1"]
    assert pins.configure(bad) is None
    assert pins.routing.pins == ["m-b"]
    assert keys(pins.refresh()) == ["m-b@1"]


def test_a_fresh_replica_falls_back_to_the_accepted_routing(published: ModelStore) -> None:
    refused = {"pins": ["m-nope"]}
    pins = ConfigPins(published, "tabular", POOLS)
    assert keys(pins.configure(refused, accepted=lambda: {"pins": ["m-a@1"]})) == ["m-a@1"]
    assert pins.routing.pins == ["m-a@1"]
    # once a routing was taken, a refusal keeps it: no fallback
    assert pins.configure(refused, accepted=lambda: {"pins": ["m-b"]}) is None
    assert pins.routing.pins == ["m-a@1"]

    def down() -> None:
        raise StorageUnavailable("model store unavailable")

    for accepted in (lambda: None, down, lambda: refused):
        assert ConfigPins(published, "tabular", POOLS).configure(refused, accepted) is None


def test_a_store_that_is_down_refuses_nothing_and_is_retried(published: ModelStore) -> None:
    pins = ConfigPins(published, "tabular", POOLS)
    assert keys(pins.configure({"pins": ["m-b@1"]})) == ["m-b@1"]
    find, cat = published.fs.find, published.fs.cat_file

    def refused(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError("connection refused")

    published.fs.find = refused  # type: ignore[method-assign]
    published.fs.cat_file = refused  # type: ignore[method-assign]
    try:
        # m-b@1 was read before (versions are immutable); m-a cannot be listed right now
        assert keys(pins.configure({"pins": ["m-a", "m-b@1"]})) == ["m-b@1"]
        assert "model store unavailable" in pins.errors["m-a"]
        assert pins.needs_refresh
        assert keys(pins.refresh()) == ["m-b@1"]
    finally:
        published.fs.find, published.fs.cat_file = find, cat  # type: ignore[method-assign]
    assert keys(pins.refresh()) == ["m-a@2", "m-b@1"]
    assert pins.errors == {}


def test_a_latest_pin_keeps_its_version_while_the_store_is_down(published: ModelStore) -> None:
    pins = ConfigPins(published, "tabular", POOLS)
    assert keys(pins.configure({"pins": ["m-a"]})) == ["m-a@2"]

    def refused(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError("connection refused")

    published.fs.find = refused  # type: ignore[method-assign]
    assert keys(pins.refresh()) == ["m-a@2"]
    assert list(pins.errors) == ["m-a"]


async def test_resolved_pins_become_resident_on_the_host(
    published: ModelStore, host: ModelHost
) -> None:
    """What the deployment's reconfigure() does with them: `host.set_pins`."""
    pins = ConfigPins(published, host.pool, [host.pool])
    manifests = pins.configure({"pins": ["m-a", "m-b@1"]})
    assert await host.set_pins(manifests) == {}
    assert sorted(host.cache.pinned_keys()) == ["m-a@2", "m-b@1"]
    assert set(host.cache.resident_keys()) == {"m-a@2", "m-b@1"}
    await host.set_pins(pins.configure({"pins": ["m-b@1"]}))
    assert host.cache.pinned_keys() == ["m-b@1"]
    assert "m-a@2" in host.cache.resident_keys()  # unpinned, not evicted
