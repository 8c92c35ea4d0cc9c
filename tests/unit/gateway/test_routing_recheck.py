"""Routing and the registry over time (issue 15 item 5): a shadow whose target disappears
never fails the request it copies; the routing is re-checked whenever the registry changes;
a routing accepted while the registry was unreadable is validated once it is readable, and
recorded as accepted only then (or refused, with the last accepted routing taking over)."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.config import IngressConfig, PoolConfig, RoutingConfig
from serve_app.gateway.gateway import Gateway
from serve_app.gateway.routing_table import RoutingTable
from serve_app.host.model_host import ModelHost
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore

ROW = [[0.1, -0.2, 0.3, 0.4]]
SHADOWED = {"ab": {"arms": [{"target": "m-a@1", "weight": 100}], "shadow": {"target": "m-b@1"}}}


def _table(registry: Registry, **routing: Any) -> RoutingTable:
    return RoutingTable(RoutingConfig.model_validate(routing), [PoolConfig()], registry)


def _remove(store: ModelStore, model_id: str, version: str) -> None:
    store.fs.rm(store.version_dir(model_id, version), recursive=True)


async def test_a_shadow_whose_target_disappears_never_fails_the_request(
    published: ModelStore, host: ModelHost
) -> None:
    registry = Registry(published, refresh_s=60)
    registry.refresh()
    gateway = Gateway(registry, host.predict, IngressConfig())
    gateway.set_routing(_table(registry, aliases=SHADOWED))
    _remove(published, "m-b", "1")
    registry.refresh()
    result = await gateway.predict("ab", ROW)
    assert (result.model_id, result.arm) == ("m-a", "m-a@1")
    (shadow,) = [a for a in gateway.arm_stats.snapshot() if a["role"] == "shadow"]
    assert shadow["arm"] == "m-b@1"
    assert shadow["dropped"] == 1


def test_the_routing_is_rechecked_when_the_registry_changes(published: ModelStore) -> None:
    registry = Registry(published, refresh_s=60)
    registry.refresh()
    gateway = Gateway(registry, _no_dispatch, IngressConfig())
    gateway.set_routing(_table(registry, aliases=SHADOWED))
    checks: list[list[str]] = []
    registry.on_change = lambda: checks.append(gateway.recheck_routing())
    registry.refresh()
    assert checks == []  # nothing changed: no re-check
    _remove(published, "m-b", "1")
    registry.refresh()
    assert len(checks) == 1
    assert "shadow" in checks[0][0]
    assert "m-b" in checks[0][0]
    report = gateway.routing_report()
    assert report["checked"]  # it was valid when accepted: it keeps serving
    assert report["problems"] == checks[0]
    assert report["rejected"] is None


def test_a_routing_accepted_unchecked_is_recorded_only_once_validated(
    published: ModelStore,
) -> None:
    registry = Registry(published, refresh_s=60)  # not read yet: the store "was down"
    gateway = Gateway(registry, _no_dispatch, IngressConfig())
    table = _table(registry, aliases=SHADOWED)
    assert not table.checked
    gateway.set_routing(table)
    saved: list[dict[str, Any]] = []
    registry.on_change = lambda: gateway.recheck_routing(saved.append, lambda: None)
    registry.refresh()
    assert gateway.routing is table
    assert table.checked
    assert saved == [table.config.model_dump(mode="json")]


def test_a_routing_accepted_unchecked_and_invalid_is_refused_on_recheck(
    published: ModelStore,
) -> None:
    registry = Registry(published, refresh_s=60)
    gateway = Gateway(registry, _no_dispatch, IngressConfig())
    bad = _table(registry, aliases={"ab": {"arms": [{"target": "ghost@1", "weight": 100}]}})
    gateway.set_routing(bad)
    last_accepted = RoutingConfig.model_validate({"default_versions": {"m-a": "1"}})
    saved: list[dict[str, Any]] = []

    def fallback() -> RoutingTable:
        return RoutingTable(last_accepted, [PoolConfig()], registry)

    registry.on_change = lambda: gateway.recheck_routing(saved.append, fallback)
    registry.refresh()
    assert saved == []  # never recorded as accepted
    assert gateway.routing.config == last_accepted
    report = gateway.routing_report()
    assert "ghost" in report["rejected"]["error"]
    assert report["rejected"]["config"]["aliases"]["ab"]["arms"][0]["target"] == "ghost@1"


def test_registry_change_callback_failures_do_not_stop_the_refresh(
    published: ModelStore,
) -> None:
    def broken() -> None:
        raise RuntimeError("callback broke")

    registry = Registry(published, refresh_s=60, on_change=broken)
    assert registry.refresh() == 3
    assert registry.resolve("m-a").version == "2"


async def _no_dispatch(call: object) -> Any:
    pytest.fail("no request is dispatched in these tests")
