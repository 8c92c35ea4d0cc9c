"""The fetch path: chunked reads into preallocated buffers, streaming sha256, declared-size
limits (issue 6 item 3), and the disk tier's verified reads and byte budget."""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest

from serve_app.config import HostConfig
from serve_app.errors import ArtifactCorrupt, ModelTooLarge
from serve_app.host.model_host import ModelHost
from serve_app.loading.disk_tier import DiskTier
from serve_app.schemas import PredictCall
from serve_app.storage.fetch import _StreamDigest
from serve_app.storage.manifest import FileEntry, Manifest
from serve_app.storage.store import ModelStore


def test_stream_digest_matches_whole_file_hash_in_any_landing_order() -> None:
    data = bytearray(random.Random(1).randbytes(10_000))
    ranges = [(s, min(s + 700, len(data))) for s in range(0, len(data), 700)]
    random.Random(2).shuffle(ranges)
    digest = _StreamDigest(data)
    for start, end in ranges:
        digest.landed(start, end)
    assert digest.hashed_bytes == len(data)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_fetch_streams_every_chunk_into_place(published: ModelStore) -> None:
    config = published.config.model_copy(update={"chunk_bytes": 64, "max_concurrency": 4})
    store = ModelStore(config, fs=published.fs)
    manifest = store.read_manifest("m-a", "1")
    assert max(e.size for e in manifest.files) > 3 * config.chunk_bytes
    buffers = store.fetch(manifest)
    base = published.version_dir("m-a", "1")
    for entry in manifest.files:
        assert bytes(buffers[entry.path]) == published.fs.cat_file(f"{base}/{entry.path}")


def test_fetch_rejects_a_tampered_file(published: ModelStore) -> None:
    manifest = published.read_manifest("m-b", "1")
    path = f"{published.version_dir('m-b', '1')}/model.safetensors"
    data = bytearray(published.fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    published.fs.pipe_file(path, bytes(data))
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        published.fetch(manifest)


def _with_declared_file(store: ModelStore, model_id: str, path: str, size: int) -> Manifest:
    """A published model whose manifest additionally declares `path` at `size` bytes
    (the bucket is untrusted: nothing checks a manifest against the objects)."""
    manifest = store.read_manifest("m-a", "1")
    bogus = FileEntry(path=path, size=size, sha256="0" * 64)
    forged = manifest.model_copy(update={"model_id": model_id, "files": [*manifest.files, bogus]})
    base = store.version_dir(model_id, "1")
    for entry in manifest.files:
        store.fs.pipe_file(
            f"{base}/{entry.path}",
            store.fs.cat_file(f"{store.version_dir('m-a', '1')}/{entry.path}"),
        )
    store.fs.pipe_file(f"{base}/{path}", b"{}")
    store.fs.pipe_file(store.manifest_path(model_id, "1"), forged.model_dump_json().encode())
    return forged


async def test_a_huge_declared_tokenizer_is_refused_before_any_allocation(
    host: ModelHost, published: ModelStore
) -> None:
    manifest = _with_declared_file(published, "huge-tok", "tokenizer.json", 200 * 10**9)
    started = time.monotonic()
    with pytest.raises(ModelTooLarge):
        await host.predict(PredictCall(manifest=manifest, inputs=[[0.0] * 4], request_id="t"))
    assert time.monotonic() - started < 2
    # the replica is fine and keeps serving
    good = published.read_manifest("m-a", "1")
    response = await host.predict(PredictCall(manifest=good, inputs=[[0.0] * 4], request_id="t"))
    assert response.outputs


def test_non_weight_files_are_capped_even_when_the_budget_has_room(
    published: ModelStore, tmp_path: Path
) -> None:
    manifest = _with_declared_file(published, "big-tok", "tokenizer.json", 80 * 2**20)
    with pytest.raises(ModelTooLarge, match="max_aux_file_bytes"):
        published.fetch(manifest, limit_bytes=10 * 2**30)
    # every file counts against the limit, not only the weights
    small = _with_declared_file(published, "tok-counts", "tokenizer.json", 600_000)
    assert small.weight_bytes < 600_000 < small.total_bytes
    with pytest.raises(ModelTooLarge):
        published.fetch(small, limit_bytes=600_000)


async def test_the_cache_reserves_every_file_not_only_weights(
    published: ModelStore, tmp_path: Path
) -> None:
    manifest = _with_declared_file(published, "aux-heavy", "tokenizer.json", 3 * 2**20)
    config = HostConfig(memory_budget=2 * 2**20, disk_cache_dir=str(tmp_path), accelerator="cpu")
    host = ModelHost(config, published, replica="unit")
    assert manifest.weight_bytes < host.cache.budget_bytes < manifest.total_bytes
    with pytest.raises(ModelTooLarge):
        await host.predict(PredictCall(manifest=manifest, inputs=[[0.0] * 4], request_id="t"))


def test_disk_tier_reads_verified_copies_and_drops_corrupt_ones(
    published: ModelStore, tmp_path: Path
) -> None:
    manifest = published.read_manifest("m-a", "2")
    disk = DiskTier(tmp_path / "disk", 10 * 2**20)
    assert disk.read(manifest) is None
    buffers = published.fetch(manifest)
    disk.write(manifest, buffers, list(buffers))
    assert {p: bytes(b) for p, b in (disk.read(manifest) or {}).items()} == {
        p: bytes(b) for p, b in buffers.items()
    }
    weights = disk.path_for(manifest) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(data)
    assert disk.read(manifest) is None
    assert not disk.path_for(manifest).exists()


def test_disk_tier_prunes_least_recently_used_past_its_budget(
    published: ModelStore, tmp_path: Path
) -> None:
    manifests = [published.read_manifest(m, v) for m, v in (("m-a", "1"), ("m-a", "2"))]
    manifests.append(published.read_manifest("m-b", "1"))
    size = max(m.total_bytes for m in manifests)
    disk = DiskTier(tmp_path / "disk", int(2.5 * size))
    for i, manifest in enumerate(manifests):
        disk.write(manifest, published.fetch(manifest), [f.path for f in manifest.files])
        os.utime(disk.path_for(manifest), (1000 + i, 1000 + i))
    disk.touch(manifests[0])  # the oldest becomes the newest
    assert disk.prune() > 0
    assert disk.read(manifests[0]) is not None
    assert disk.read(manifests[1]) is None  # least recently used goes first
    assert disk.read(manifests[2]) is not None


def test_the_disk_copy_of_an_evicted_model_is_abandoned(
    published: ModelStore, tmp_path: Path
) -> None:
    import weakref

    from serve_app.storage.fetch import host_buffer

    manifest = published.read_manifest("m-a", "1")
    disk = DiskTier(tmp_path / "disk", 2**30)
    fetched = published.fetch(manifest)
    buffers = {p: host_buffer(len(b)) for p, b in fetched.items()}
    for path, buffer in buffers.items():
        memoryview(buffer)[:] = fetched[path]
    refs = {p: weakref.ref(b) for p, b in buffers.items()}
    assert disk.write_weak(manifest, refs)
    assert disk.read(manifest) is not None
    other = published.read_manifest("m-a", "2")
    refs = {p: weakref.ref(host_buffer(10)) for p in ("model.safetensors",)}  # already freed
    assert not disk.write_weak(other, refs)
    assert not [p for p in disk.path_for(other).rglob("*") if p.is_file()]


def test_a_load_leaves_a_verified_disk_copy_behind(published: ModelStore, tmp_path: Path) -> None:
    import threading

    import torch

    from serve_app.loading.loader import ModelLoader

    loader = ModelLoader(published, DiskTier(tmp_path / "disk", 2**30), torch.device("cpu"))
    manifest = published.read_manifest("m-a", "1")
    predictor = loader.load(manifest)
    for thread in threading.enumerate():
        if thread.name.startswith("disk-tier:"):
            thread.join(30)
    # every file, the small non-weight ones included (only weights are held weakly)
    assert loader.disk.read(manifest) is not None
    assert not list((tmp_path / "disk").rglob("*.part-*"))
    assert predictor.predict([[0.0] * 4])
