"""Manifests have a size cap (issue 15 item 5): the bucket is untrusted input, and a
manifest of gigabytes must not be read into the registry's memory. An oversized manifest is
skipped by the registry (the other models stay served) and refused by a direct read."""

from __future__ import annotations

import pytest

from serve_app.errors import ArtifactCorrupt
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore


def _oversized(store: ModelStore, model_id: str, cap: int) -> str:
    """Publish `model_id`@1 as a copy of m-b's manifest padded past `cap` (still valid)."""
    manifest = store.read_manifest("m-b", "1").model_copy(update={"model_id": model_id})
    body = manifest.model_dump_json().encode()
    body += b" " * (cap + 1 - len(body))
    path = store.manifest_path(model_id, "1")
    store.fs.pipe_file(path, body)
    return path


def test_the_registry_skips_an_oversized_manifest(published: ModelStore) -> None:
    cap = 4096
    store = ModelStore(
        published.config.model_copy(update={"max_manifest_bytes": cap}), fs=published.fs
    )
    _oversized(store, "huge", cap)
    registry = Registry(store)
    registry.refresh()
    assert [m.model_id for m in registry.summaries()] == ["m-a", "m-b"]
    # the same bytes under the default cap (1 MiB) are an ordinary manifest
    default = Registry(published)
    default.refresh()
    assert "huge" in [m.model_id for m in default.summaries()]


def test_reading_an_oversized_manifest_is_refused(published: ModelStore) -> None:
    cap = 4096
    store = ModelStore(
        published.config.model_copy(update={"max_manifest_bytes": cap}), fs=published.fs
    )
    _oversized(store, "huge", cap)
    with pytest.raises(ArtifactCorrupt, match="max_manifest_bytes"):
        store.read_manifest("huge", "1")
    assert store.read_manifest("m-b", "1").model_id == "m-b"
