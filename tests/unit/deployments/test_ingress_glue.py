"""The ingress's Ray glue without Ray running (issue 15 item 5): management commands read
the replica directory (GCS) off the event loop, and a routing accepted while the registry
was unreadable is recorded as accepted only once the registry re-check has validated it."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import deployments.ingress as ingress_module
from deployments.ingress import Ingress, ServeHostControl
from serve_app.config import IngressConfig, PoolConfig
from serve_app.gateway.gateway import Gateway
from serve_app.schemas import HostCommand, HostReply
from serve_app.storage.registry import Registry
from serve_app.storage.state_store import AcceptedRouting, StoreKeyValue
from serve_app.storage.store import ModelStore

REPLY = HostReply(
    replica="r1", key="m-a@1", changed=True, resident=True, pinned=False, bytes=1, in_flight=0
)


class _Method:
    def __init__(self) -> None:
        self.calls = 0

    def remote(self, command: HostCommand) -> asyncio.Future[HostReply]:
        self.calls += 1
        future: asyncio.Future[HostReply] = asyncio.get_running_loop().create_future()
        future.set_result(REPLY)
        return future


class _Pool:
    """A pool handle that answers every `manage` call at once."""

    def __init__(self) -> None:
        self.manage = _Method()


async def test_commands_read_the_replica_directory_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop_thread = threading.current_thread()
    readers: list[threading.Thread] = []

    def read_replicas(app: str, kind: str, **kwargs: Any) -> list[dict[str, Any]]:
        readers.append(threading.current_thread())  # NOTE: GCS calls block: never the loop
        return [{"replica": "r1", "pool": "default"}]

    monkeypatch.setattr(ingress_module, "read_replicas", read_replicas)
    pool = _Pool()
    control = ServeHostControl({"default": pool}, "fleet", timeout_s=5)  # type: ignore[dict-item]
    reply = await control.command(HostCommand(op="unload", replica="r1", key="m-a@1"))
    assert reply == REPLY
    assert pool.manage.calls == 1
    assert readers
    assert loop_thread not in readers


class _BareIngress(Ingress.func_or_class):  # type: ignore[misc,name-defined]
    """The Ingress class without Serve's wrapper __init__ (built with object.__new__) and
    so without its async __del__, which would only warn here."""

    def __del__(self) -> None:
        pass


async def test_a_routing_accepted_while_the_registry_is_unreadable_is_recorded_once_checked(
    published: ModelStore,
) -> None:
    registry = Registry(published, refresh_s=60)  # not read yet: the store "is down"
    ingress = object.__new__(_BareIngress)
    ingress.registry = registry
    ingress._pool_configs = [PoolConfig()]
    ingress._accepted = False
    ingress._accepted_routing = AcceptedRouting(StoreKeyValue.of(published), "fleet")
    ingress.gateway = Gateway(registry, _no_dispatch, IngressConfig())
    registry.on_change = ingress._on_registry_change
    config = {"aliases": {"ab": {"arms": [{"target": "m-a@1", "weight": 100}]}}}
    await ingress.reconfigure(config)
    assert ingress.gateway.routing.config.aliases["ab"].arms[0].target == "m-a@1"
    assert not ingress.gateway.routing.checked
    assert ingress._accepted_routing.read() is None  # not recorded as checked
    registry.refresh()
    assert ingress.gateway.routing.checked
    assert ingress._accepted_routing.read() == ingress.gateway.routing.config.model_dump(
        mode="json"
    )


async def _no_dispatch(call: object) -> Any:
    pytest.fail("no request is dispatched in this test")


async def test_a_routing_built_just_before_the_first_registry_read_is_checked_at_once(
    published: ModelStore,
) -> None:
    """The registry's first read lands while the new table is being built: its change
    callback checks the previous table, so reconfigure checks the new one itself."""
    registry = Registry(published, refresh_s=60)
    ingress = object.__new__(_BareIngress)
    ingress.registry = registry
    ingress._pool_configs = [PoolConfig()]
    ingress._accepted = False
    ingress._accepted_routing = AcceptedRouting(StoreKeyValue.of(published), "fleet")
    ingress.gateway = Gateway(registry, _no_dispatch, IngressConfig())
    registry.on_change = ingress._on_registry_change
    compile_unread = ingress._compile

    def compile_then_registry_read(user_config: dict[str, Any]) -> Any:
        table = compile_unread(user_config)  # the store still unreadable: unchecked
        registry.refresh()  # ... and readable right after
        return table

    ingress._compile = compile_then_registry_read
    await ingress.reconfigure({"default_versions": {"m-a": "1"}})
    assert ingress.gateway.routing.config.default_versions == {"m-a": "1"}
    assert ingress.gateway.routing.checked
    saved = ingress._accepted_routing.read()
    assert saved == ingress.gateway.routing.config.model_dump(mode="json")


def test_the_default_routing_is_never_recorded_as_accepted(published: ModelStore) -> None:
    """Before any reconfigure() the default routing serves; a registry read then must not
    record it over the accepted routing in the store."""
    registry = Registry(published, refresh_s=60)
    ingress = object.__new__(_BareIngress)
    ingress.registry = registry
    ingress._pool_configs = [PoolConfig()]
    ingress._accepted = False
    ingress._accepted_routing = AcceptedRouting(StoreKeyValue.of(published), "fleet")
    ingress._accepted_routing.save({"default_versions": {"m-a": "1"}})
    ingress.gateway = Gateway(registry, _no_dispatch, IngressConfig())
    registry.on_change = ingress._on_registry_change
    registry.refresh()
    assert ingress._accepted_routing.read() == {"default_versions": {"m-a": "1"}}
