"""The lean S3 lister against real SeaweedFS: the same keys s3fs finds, across pages."""

from __future__ import annotations

import uuid

import pytest
from pydantic import SecretStr

from devstack.seaweed import SeaweedServer
from serve_app.config import StoreConfig
from serve_app.errors import StorageUnavailable
from serve_app.storage.listing import S3Lister
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore

pytestmark = pytest.mark.integration


def test_same_keys_as_s3fs_over_several_pages(s3: SeaweedServer) -> None:
    store = ModelStore(StoreConfig(url=f"s3://fleet/list-{uuid.uuid4().hex[:8]}"))
    files = {
        f"{store.root}/m-{i:04d}/1/{name}": b"x"
        for i in range(210)
        for name in ("manifest.json", "config.json", "model.safetensors", "vocab.txt", "a.json")
    }  # 1,050 keys: two pages of ListObjectsV2
    odd = ["notes/a b+c.txt", "notes/é ü/%41.json", "m-0000/1/deeper/manifest.json"]
    files.update({f"{store.root}/{key}": b"y" for key in odd})
    store.fs.pipe(files)
    bucket, prefix = store.root.split("/", 1)
    objects = S3Lister(store.config).objects(bucket, prefix + "/")
    keys = [key for key, _ in objects]
    assert sorted(f"{bucket}/{k}" for k in keys) == sorted(store.fs.find(store.root))
    assert len(keys) == len(files)
    # the sizes the manifest cap is checked against, as the store listed them
    assert {f"{bucket}/{k}": size for k, size in objects} == {p: len(d) for p, d in files.items()}
    manifests = store.list_manifest_paths()  # exactly <id>/<version>/manifest.json
    assert manifests == sorted(f"{store.root}/m-{i:04d}/1/manifest.json" for i in range(210))


def test_a_missing_bucket_lists_nothing(s3: SeaweedServer) -> None:
    store = ModelStore(StoreConfig(url=f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/models"))
    assert store.list_manifest_paths() == []


def test_a_refused_listing_falls_back_to_s3fs_and_still_fails_typed(
    s3: SeaweedServer, store_config: StoreConfig
) -> None:
    wrong = store_config.model_copy(
        update={
            "access_key_id": SecretStr(s3.env()["AWS_ACCESS_KEY_ID"]),
            "secret_access_key": SecretStr("not-the-secret"),
        }
    )
    store = ModelStore(wrong)
    with pytest.raises(StorageUnavailable):
        store.list_manifest_paths()
    assert store._lister is None  # refused once: s3fs lists from now on
    registry = Registry(store)
    assert registry.refresh_quietly() is False
    assert registry.last_error is not None
    assert "not-the-secret" not in registry.last_error
