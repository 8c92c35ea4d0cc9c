"""Tenants without HTTP: token buckets, cold-load caps, scopes (globs, tags, aliases),
handle callers, and the dispatch gate (a refused cold load never reaches dispatch)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from devstack.demo_fleet import write_fraud_model
from serve_app.auth.keys import hash_key
from serve_app.auth.settings import AuthConfig
from serve_app.auth.tenants import ColdLoads, Tenants, TokenBucket, current, run_as
from serve_app.errors import ColdLoadLimited, OutOfScope, RateLimited, Unauthorized
from serve_app.storage.publisher import publish_path
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore
from tests.support import ADMIN_KEY, SMALL

KEY_A = "key-of-tenant-a-0123456789"
KEY_B = "key-of-tenant-b-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_grants_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.take() == 0.0
    assert bucket.take() > 0


def test_cold_loads_cap_distinct_models() -> None:
    cold = ColdLoads(2)
    cold.enter("a@1")
    cold.enter("a@1")  # the same model again: free
    cold.enter("b@1")
    with pytest.raises(ColdLoadLimited) as caught:
        cold.enter("c@1")
    assert caught.value.status_code == 429
    assert caught.value.headers()["Retry-After"] == "1"
    cold.leave("a@1")
    with pytest.raises(ColdLoadLimited):
        cold.enter("c@1")  # a@1 still has one request in flight
    cold.leave("a@1")
    cold.enter("c@1")
    assert cold.models == 2


@pytest.fixture
def registry(published: ModelStore, tmp_path: Path) -> Registry:
    """m-a (v1, v2), m-b, and `tagged` (manifest tag team-a)."""
    src = write_fraud_model(tmp_path / "tagged", 0, 4, SMALL)
    publish_path(published, src, "tagged", "1", tags=["team-a"])
    registry = Registry(published, refresh_s=60)
    registry.refresh()
    return registry


def tenants(registry: Registry, resident: frozenset[str] = frozenset(), **tenant_a: Any) -> Tenants:
    config = AuthConfig.model_validate(
        {
            "tenants": [
                {
                    "name": "a",
                    "key_hashes": [hash_key(KEY_A)],
                    "models": ["m-a*"],
                    "tags": ["team-a"],
                    "aliases": ["scorer"],
                    **tenant_a,
                },
                {"name": "b", "key_hashes": [hash_key(KEY_B)], "models": ["m-b"]},
            ]
        }
    )
    return Tenants(
        config,
        hash_key(ADMIN_KEY),
        registry,
        is_alias=lambda name: name in ("scorer", "m-alias"),
        resident=lambda: resident,
    )


def test_scope_by_glob_tag_and_alias(registry: Registry) -> None:
    t = tenants(registry)
    a = t.authenticate(KEY_A)
    for allowed in ("m-a", "m-a-unknown", "m-a@2", "tagged", "tagged@1", "scorer"):
        t.authorize(a, allowed)
    for refused in ("m-b", "m-alias", "unknown-model", "tagged@7"):
        with pytest.raises(OutOfScope) as caught:
            t.authorize(a, refused)
        assert caught.value.status_code == 403
    b = t.authenticate(KEY_B)
    with pytest.raises(OutOfScope):
        t.authorize(b, "m-a")
    assert t.visible(b, ["m-a", "m-b", "tagged"]) == ["m-b"]
    assert t.visible(a, ["m-a", "m-b", "tagged"]) == ["m-a", "tagged"]


def test_unknown_and_existing_models_are_refused_alike(registry: Registry) -> None:
    t = tenants(registry)
    b = t.authenticate(KEY_B)
    refusals = []
    for name in ("m-a", "m-c"):  # m-a exists, m-c does not
        with pytest.raises(OutOfScope) as caught:
            t.authorize(b, name)
        refusals.append((caught.value.code, caught.value.message.replace(name, "NAME")))
    assert refusals[0] == refusals[1]


def test_authentication(registry: Registry) -> None:
    t = tenants(registry)
    assert t.authenticate(KEY_A).name == "a"
    assert t.authenticate(ADMIN_KEY).name == "admin"
    for bad in (None, "", "wrong-key-wrong-key", KEY_A + "x"):
        with pytest.raises(Unauthorized):
            t.authenticate(bad)
    admin = t.authenticate(ADMIN_KEY)
    t.authorize(admin, "m-b")  # the admin may call every model


def test_rate_limit_is_per_tenant(registry: Registry) -> None:
    t = tenants(registry, rate_per_s=0.5, burst=2)
    a, b = t.authenticate(KEY_A), t.authenticate(KEY_B)
    t.authorize(a, "m-a")
    t.authorize(a, "m-a")
    with pytest.raises(RateLimited) as caught:
        t.authorize(a, "m-a")
    assert caught.value.headers()["Retry-After"] == "2"
    t.authorize(b, "m-b")  # another tenant is not throttled


def test_handle_callers_name_a_tenant_or_none(registry: Registry) -> None:
    t = tenants(registry)
    t.for_handle(None, "anything")  # inside Ray's trust boundary: unchecked
    t.for_handle("a", "m-a")
    with pytest.raises(OutOfScope):
        t.for_handle("a", "m-b")
    with pytest.raises(OutOfScope):
        t.for_handle("nobody", "m-a")


async def test_gate_caps_cold_loads_and_lets_warm_ones_through(registry: Registry) -> None:
    t = tenants(registry, resident=frozenset({"warm@1"}), max_cold_loads=1)
    run_as(None)  # NOTE: the sync tests above ran authorize() in this thread's context
    release = asyncio.Event()
    dispatched: list[str] = []

    async def dispatch(key: str) -> str:
        dispatched.append(key)
        await release.wait()
        return key

    gated = t.gate(dispatch, key_of=lambda key: key)

    async def call_as(principal_key: str, model_key: str) -> str:
        run_as(t.authenticate(principal_key))
        return await gated(model_key)

    first = asyncio.create_task(call_as(KEY_A, "cold-1@1"))
    await asyncio.sleep(0)
    with pytest.raises(ColdLoadLimited):
        await asyncio.create_task(call_as(KEY_A, "cold-2@1"))
    assert dispatched == ["cold-1@1"]  # the refused cold load never reached dispatch
    warm = asyncio.create_task(call_as(KEY_A, "warm@1"))
    other = asyncio.create_task(call_as(KEY_B, "cold-3@1"))  # another tenant's own cap
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(first, warm, other) == ["cold-1@1", "warm@1", "cold-3@1"]
    await asyncio.create_task(call_as(KEY_A, "cold-2@1"))  # the first finished: room again
    assert current() is None  # tasks kept their principal to themselves


def test_config_refuses_plain_keys_reserved_names_and_duplicates() -> None:
    base = {"name": "t", "key_hashes": [hash_key(KEY_A)]}
    with pytest.raises(ValidationError):
        AuthConfig.model_validate({"tenants": [{**base, "key": KEY_A}]})
    with pytest.raises(ValidationError):
        AuthConfig.model_validate({"tenants": [{**base, "key_hashes": [KEY_A]}]})
    with pytest.raises(ValidationError, match="no key"):
        AuthConfig.model_validate({"tenants": [{"name": "t"}]})
    with pytest.raises(ValidationError, match="reserved"):
        AuthConfig.model_validate({"tenants": [{**base, "name": "admin"}]})
    with pytest.raises(ValidationError, match="unique"):
        AuthConfig.model_validate({"tenants": [base, base]})


def test_residency_view_reads_resident_and_loading_keys_at_once() -> None:
    import threading

    from serve_app.auth.tenants import ResidencyView

    reads = threading.Event()
    hosts = [{"models": [{"key": "a@1"}], "loading": ["b@1"]}, {"models": [{"key": "c@2"}]}]

    def source() -> list[dict[str, Any]]:
        reads.set()
        return hosts

    view = ResidencyView(source, interval_s=60)
    view.start()
    try:
        assert reads.wait(5)  # the first read does not wait for the interval
        from tests.support import wait_for

        wait_for(lambda: view.keys() == {"a@1", "b@1", "c@2"}, 5, "the first refresh")
    finally:
        view.stop()
