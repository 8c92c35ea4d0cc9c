"""Serving state in the model store (`StoreKeyValue`, `AcceptedRouting`) over fsspec's
memory filesystem: the pin store's key-value contract, keys that cannot escape their folder,
typed errors when the store fails, and a registry that never mistakes state for a model."""

from __future__ import annotations

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from serve_app.errors import StorageUnavailable
from serve_app.management.pins import PinRecord, PinStore
from serve_app.storage.registry import Registry
from serve_app.storage.state_store import (
    STATE_DIR,
    AcceptedRouting,
    StoreKeyValue,
    is_state_path,
)
from serve_app.storage.store import ModelStore


@pytest.fixture
def kv(store: ModelStore) -> StoreKeyValue:
    return StoreKeyValue.of(store)


def test_get_put_overwrite_delete(kv: StoreKeyValue, store: ModelStore) -> None:
    assert kv.get("app/pins/m@1") is None
    kv.put("app/pins/m@1", b"one")
    assert kv.get("app/pins/m@1") == b"one"
    kv.put("app/pins/m@1", b"two")
    assert kv.get("app/pins/m@1") == b"two"
    assert store.fs.exists(f"{store.root}/{STATE_DIR}/app/pins/m@1")
    kv.delete("app/pins/m@1")
    assert kv.get("app/pins/m@1") is None
    kv.delete("app/pins/m@1")  # absent: no error


def test_keys_match_the_prefix_only(kv: StoreKeyValue) -> None:
    assert kv.keys("app/pins/") == []  # nothing written yet
    for key in ("app/pins/b@1", "app/pins/a@2", "app/pins2/c@1", "other/pins/d@1"):
        kv.put(key, b"{}")
    assert kv.keys("app/pins/") == ["app/pins/a@2", "app/pins/b@1"]
    assert kv.keys("app/pins") == ["app/pins/a@2", "app/pins/b@1", "app/pins2/c@1"]
    assert kv.keys("app/") == ["app/pins/a@2", "app/pins/b@1", "app/pins2/c@1"]
    assert len(kv.keys("")) == 4


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "../x", "a/./b", "a\\b"])
def test_keys_cannot_leave_the_state_folder(kv: StoreKeyValue, key: str) -> None:
    with pytest.raises(ValueError, match="not a state key"):
        kv.put(key, b"x")
    with pytest.raises(ValueError, match="not a state key"):
        kv.get(key)


def test_pin_store_round_trip(kv: StoreKeyValue, published: ModelStore) -> None:
    manifest = published.read_manifest("m-a", "2")
    pins = PinStore(kv, "fleet")
    pins.put(PinRecord(manifest=manifest, pool="text", pinned_at=1.0))
    pins.put(PinRecord(manifest=published.read_manifest("m-b", "1"), pinned_at=2.0))
    assert [r.key for r in pins.list()] == ["m-a@2", "m-b@1"]
    assert pins.get("m-a@2").pool == "text"
    assert PinStore(kv, "other-app").list() == []
    assert pins.delete("m-a@2") is True
    assert pins.delete("m-a@2") is False
    assert [r.key for r in pins.list()] == ["m-b@1"]


def test_accepted_routing(kv: StoreKeyValue) -> None:
    accepted = AcceptedRouting(kv, "fleet")
    assert accepted.read() is None
    accepted.save({"pins": ["m-a"], "aliases": {}})
    assert accepted.read() == {"pins": ["m-a"], "aliases": {}}
    assert AcceptedRouting(kv, "pools").read() is None
    kv.put("fleet/routing/accepted", b"not json")
    assert accepted.read() is None  # a damaged record is as good as none


def test_registry_never_lists_state(kv: StoreKeyValue, published: ModelStore) -> None:
    registry = Registry(published, refresh_s=60)
    known = registry.refresh()
    # NOTE: `x/manifest.json` sits exactly where a model's manifest would: <root>/_fleet/x/...
    kv.put("x/manifest.json", published.read_manifest("m-b", "1").model_dump_json().encode())
    kv.put("fleet/pins/m-a@1", b"{}")
    reads: list[list[str]] = []
    read = published.read_manifests
    published.read_manifests = lambda paths: reads.append(paths) or read(paths)  # type: ignore[method-assign]
    assert registry.refresh() == known
    assert reads == [[]]  # nothing new was even read
    assert [s.model_id for s in registry.summaries()] == ["m-a", "m-b"]
    root = published.root
    assert is_state_path(root, f"/{root}/_fleet/x/manifest.json")
    assert not is_state_path(root, f"{root}/m-a/1/manifest.json")


class _DownFS(MemoryFileSystem):
    """A filesystem whose every call fails like an unreachable endpoint."""

    def cat_file(self, *args: object, **kwargs: object) -> bytes:
        raise ConnectionRefusedError("connection refused")

    def pipe_file(self, *args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError("connection refused")

    def rm_file(self, *args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError("connection refused")

    def find(self, *args: object, **kwargs: object) -> list[str]:
        raise ConnectionRefusedError("connection refused")


def test_a_store_that_is_down_is_storage_unavailable() -> None:
    kv = StoreKeyValue(_DownFS(skip_instance_cache=True), "fleet/unit")
    for call in (
        lambda: kv.get("a/b"),
        lambda: kv.put("a/b", b"x"),
        lambda: kv.delete("a/b"),
        lambda: kv.keys("a/"),
        lambda: PinStore(kv, "a").list(),
        lambda: AcceptedRouting(kv, "a").read(),
    ):
        with pytest.raises(StorageUnavailable, match="serving state: ConnectionRefusedError"):
            call()
