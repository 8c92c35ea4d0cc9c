"""The bucket is untrusted input: forged or hostile manifests are never served, and a
version is published exactly once even when two publishers race (real SeaweedFS)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from devstack.demo_fleet import write_fraud_model
from serve_app.errors import ModelNotFound, VersionExists
from serve_app.storage.manifest import Manifest
from serve_app.storage.publisher import build_manifest
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore

pytestmark = pytest.mark.integration


def _plant(store: ModelStore, model_id: str, version: str, body: dict) -> None:
    """Write a manifest straight into the bucket, as an attacker with write access could."""
    store.fs.pipe_file(store.manifest_path(model_id, version), json.dumps(body).encode())


def test_a_manifest_claiming_another_id_is_ignored(
    store: ModelStore, fleet: dict[str, Manifest]
) -> None:
    genuine = next(m for m in fleet.values() if m.model_id.startswith("fraud"))
    forged = genuine.model_dump() | {"description": "forged"}
    # under forged-claim/1/ but claiming to be the genuine model's id and version
    _plant(store, "forged-claim", genuine.version, forged)
    registry = Registry(store)
    registry.refresh()
    with pytest.raises(ModelNotFound):
        registry.resolve("forged-claim")
    assert registry.resolve(genuine.model_id, genuine.version) == genuine


def test_manifests_with_hostile_file_paths_are_never_listed(
    store: ModelStore, fleet: dict[str, Manifest], tmp_path: Path
) -> None:
    genuine = next(m for m in fleet.values() if m.model_id.startswith("fraud")).model_dump()
    target = tmp_path / "outside.safetensors"
    for i, path in enumerate(["../../../../" + str(target).lstrip("/"), str(target), "a.py"]):
        files = [dict(genuine["files"][0], path=path)]
        _plant(store, f"hostile-{i}", "1", genuine | {"model_id": f"hostile-{i}", "files": files})
    registry = Registry(store)
    registry.refresh()
    for i in range(3):
        with pytest.raises(ModelNotFound):
            registry.resolve(f"hostile-{i}")
    assert not target.exists()


def test_two_concurrent_publishers_of_one_version_publish_it_once(
    store: ModelStore, tmp_path: Path
) -> None:
    sources = [write_fraud_model(tmp_path / f"src-{i}", i, seed=100 + i) for i in range(2)]
    manifests = [build_manifest(src, "race-model", "1") for src in sources]
    assert manifests[0].files != manifests[1].files  # different weights, different digests
    start = threading.Barrier(2)
    outcomes: list[Manifest | BaseException] = [ValueError("not run")] * 2

    def publish(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = store.publish(sources[i], manifests[i])
        except VersionExists as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    winners = [o for o in outcomes if isinstance(o, Manifest)]
    losers = [o for o in outcomes if isinstance(o, VersionExists)]
    assert (len(winners), len(losers)) == (1, 1), outcomes
    # the stored version is the winner's, whole: every file matches its manifest digest
    assert store.read_manifest("race-model", "1") == winners[0]
    store.fetch(winners[0])  # raises ArtifactCorrupt unless every digest matches
    with pytest.raises(VersionExists):
        store.publish(sources[0], manifests[0])
