"""Serving state in the model store against real SeaweedFS: the pin store's key-value
contract over s3fs, a registry (lean lister) that never sees it, config pins resolved and
following the latest version over real S3 listings, and typed errors when S3 is down."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from devstack.demo_fleet import write_fraud_model
from devstack.seaweed import SeaweedServer, find_free_port
from serve_app.config import StoreConfig
from serve_app.errors import StorageUnavailable
from serve_app.host.config_pins import ConfigPins
from serve_app.management.pins import PinRecord, PinStore
from serve_app.storage.publisher import publish_path
from serve_app.storage.registry import Registry
from serve_app.storage.state_store import AcceptedRouting, StoreKeyValue
from serve_app.storage.store import ModelStore

pytestmark = pytest.mark.integration


@pytest.fixture
def fresh(s3: SeaweedServer, tmp_path: Path) -> ModelStore:
    """A store of its own (not the session fleet's): `st-a` v1 and v2, `st-ab` v1."""
    store = ModelStore(StoreConfig(url=f"s3://fleet/state-{uuid.uuid4().hex[:8]}"))
    store.ensure_bucket()
    for model_id, version, seed in (("st-a", "1", 1), ("st-a", "2", 2), ("st-ab", "1", 3)):
        publish_path(store, write_fraud_model(tmp_path / f"{model_id}-{version}", 0, seed),
                     model_id, version)  # fmt: skip
    return store


def test_key_value_over_s3(fresh: ModelStore) -> None:
    kv = StoreKeyValue.of(fresh)
    assert kv.get("fleet/pins/st-a@1") is None
    assert kv.keys("fleet/pins/") == []
    kv.put("fleet/pins/st-a@1", b"one")
    kv.put("fleet/pins/st-a@1", b"two")
    kv.put("fleet/pins/st-ab@1", b"three")
    kv.put("fleet/pins2/x@1", b"four")
    assert kv.get("fleet/pins/st-a@1") == b"two"
    assert kv.keys("fleet/pins/") == ["fleet/pins/st-a@1", "fleet/pins/st-ab@1"]
    kv.delete("fleet/pins/st-a@1")
    kv.delete("fleet/pins/st-a@1")  # absent: no error
    assert kv.keys("fleet/pins/") == ["fleet/pins/st-ab@1"]
    # what a restarted replica (a new process, a new Ray cluster) reads: the same records
    again = StoreKeyValue.of(ModelStore(fresh.config))
    assert again.get("fleet/pins/st-ab@1") == b"three"


def test_pins_and_accepted_routing_survive_and_the_registry_never_sees_them(
    fresh: ModelStore,
) -> None:
    kv = StoreKeyValue.of(fresh)
    pins = PinStore(kv, "fleet")
    pins.put(PinRecord(manifest=fresh.read_manifest("st-ab", "1"), pool="text"))
    AcceptedRouting(kv, "fleet").save({"pins": ["st-a"]})
    kv.put("x/manifest.json", fresh.read_manifest("st-a", "1").model_dump_json().encode())
    later = ModelStore(fresh.config)
    assert [(r.key, r.pool) for r in PinStore(StoreKeyValue.of(later), "fleet").list()] == [
        ("st-ab@1", "text")
    ]
    assert AcceptedRouting(StoreKeyValue.of(later), "fleet").read() == {"pins": ["st-a"]}
    registry = Registry(later, refresh_s=60)
    assert registry.refresh() == 3  # st-a@1, st-a@2, st-ab@1: no state record
    assert [s.model_id for s in registry.summaries()] == ["st-a", "st-ab"]


def test_config_pins_follow_the_latest_version_over_s3(fresh: ModelStore, tmp_path: Path) -> None:
    pins = ConfigPins(fresh, "tabular", ["tabular"])
    manifests = pins.configure({"pins": ["st-a", "st-ab@1"]})
    assert sorted(m.key for m in manifests) == ["st-a@2", "st-ab@1"]
    assert pins.versions("st-a") == ["1", "2"]  # not st-ab's, whose id starts the same
    publish_path(fresh, write_fraud_model(tmp_path / "st-a-3", 0, 4), "st-a", "3")
    assert sorted(m.key for m in pins.refresh()) == ["st-a@3", "st-ab@1"]
    assert pins.configure({"pins": ["st-nope"]}) is None  # unknown: refused, pins kept
    assert sorted(m.key for m in pins.refresh()) == ["st-a@3", "st-ab@1"]


def test_s3_down_is_storage_unavailable(s3: SeaweedServer) -> None:
    config = StoreConfig(
        url="s3://fleet/state-down",
        endpoint_url=f"http://127.0.0.1:{find_free_port()}",  # nothing listens there
        retries=0,
        connect_timeout_s=1,
        read_timeout_s=1,
    )
    kv = StoreKeyValue.of(ModelStore(config))
    for call in (
        lambda: kv.get("fleet/pins/a@1"),
        lambda: kv.put("fleet/pins/a@1", b"x"),
        lambda: kv.keys("fleet/pins/"),
        lambda: AcceptedRouting(kv, "fleet").read(),
    ):
        with pytest.raises(StorageUnavailable, match="serving state"):
            call()
