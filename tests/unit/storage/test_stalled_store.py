"""A stalled store is a bounded wait (issue 15 item 4), with a store whose range reads never
answer, like a SeaweedFS under SIGSTOP (tests/integration/loading/test_stalled_store.py runs
the real one): a fetch gives up once no byte has arrived for `store.stall_timeout_s`, a busy
store (bytes flowing to another fetch) is not a stalled one, and a version in the disk tier
loads without the store."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from serve_app.config import HostConfig
from serve_app.errors import StorageUnavailable
from serve_app.host.model_host import ModelHost
from serve_app.schemas import PredictCall
from serve_app.storage.fetch import ByteClock
from serve_app.storage.ranged import FsspecRangeReader, Progress
from serve_app.storage.store import ModelStore


class StalledReader(FsspecRangeReader):
    """Range reads that block until `resume` is set (then read normally)."""

    def __init__(self, store: ModelStore) -> None:
        super().__init__(store.fs)
        self.resume = threading.Event()
        self.calls = 0

    def read_into(
        self,
        path: str,
        start: int,
        view: memoryview,
        deadline: float,
        progress: Progress | None = None,
    ) -> None:
        self.calls += 1
        self.resume.wait(30)
        super().read_into(path, start, view, deadline, progress)


@pytest.fixture
def stalled(published: ModelStore) -> tuple[ModelStore, StalledReader]:
    config = published.config.model_copy(update={"stall_timeout_s": 0.5, "chunk_bytes": 256})
    store = ModelStore(config, fs=published.fs)
    reader = StalledReader(store)
    store.reader = reader
    yield store, reader
    reader.resume.set()
    store.close()


def test_a_stalled_fetch_fails_after_the_stall_timeout(
    stalled: tuple[ModelStore, StalledReader],
) -> None:
    store, reader = stalled
    manifest = store.read_manifest("m-a", "1")
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="stall_timeout_s") as info:
        store.fetch(manifest)
    elapsed = time.monotonic() - started
    assert 0.45 < elapsed < 3, elapsed  # not the 600 s download timeout
    assert info.value.retry_after_s is not None
    assert reader.calls >= 1


def test_a_busy_store_is_not_a_stalled_one(published: ModelStore) -> None:
    """Bytes arriving for another fetch of the same store keep this one's watchdog quiet."""
    config = published.config.model_copy(update={"stall_timeout_s": 0.3, "chunk_bytes": 256})
    store = ModelStore(config, fs=published.fs)
    reader = StalledReader(store)
    store.reader = reader
    manifest = store.read_manifest("m-a", "1")
    fetch = store.start_fetch(manifest)
    clock: ByteClock = store._clock
    stop = threading.Event()

    def other_fetch_receiving() -> None:
        while not stop.wait(0.05):
            clock.tick(4096)

    ticker = threading.Thread(target=other_fetch_receiving, daemon=True)
    ticker.start()
    try:
        threading.Timer(1.0, reader.resume.set).start()  # 3x the stall timeout
        buffers = fetch.wait()
    finally:
        stop.set()
        ticker.join()
        store.close()
    assert set(buffers) == {e.path for e in manifest.files}


async def test_disk_tier_loads_while_the_store_is_stalled_and_the_rest_get_503(
    stalled: tuple[ModelStore, StalledReader], tmp_path: Path
) -> None:
    store, reader = stalled
    first, second = store.read_manifest("m-a", "1"), store.read_manifest("m-b", "1")
    config = HostConfig(
        memory_budget=2**20, disk_cache_dir=str(tmp_path / "disk"), accelerator="cpu"
    )
    # NOTE: fill the disk tier with m-a through a healthy reader first
    stalled_reader, store.reader = store.reader, FsspecRangeReader(store.fs)
    host = ModelHost(config, store, replica="unit")
    try:
        call = PredictCall(manifest=first, inputs=[[0.0] * 4], request_id="r")
        expected = (await host.predict(call)).outputs
        for thread in threading.enumerate():
            if thread.name.startswith("disk-tier:"):
                thread.join(30)
        host.cache.unload(first.key)
        store.reader = stalled_reader
        started = time.monotonic()
        response = await host.predict(call)
        assert response.outputs == expected
        assert not response.resident
        assert time.monotonic() - started < 0.5  # no stall timeout in the way
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="stall_timeout_s"):
            await host.predict(PredictCall(manifest=second, inputs=[[0.0] * 4], request_id="s"))
        assert time.monotonic() - started < 3
        assert reader.calls >= 1
    finally:
        await host.close()


async def test_a_disk_tier_load_never_queues_behind_loads_stuck_on_the_store(
    published: ModelStore, tmp_path: Path
) -> None:
    """Every load slot held by a load waiting on a stalled store: a version on disk still
    loads at once, on slots of its own."""
    config = published.config.model_copy(update={"stall_timeout_s": 5.0, "chunk_bytes": 256})
    store = ModelStore(config, fs=published.fs)
    on_disk = store.read_manifest("m-a", "1")
    remote = [store.read_manifest("m-a", "2"), store.read_manifest("m-b", "1")]
    host = ModelHost(
        HostConfig(
            memory_budget=2**20,
            disk_cache_dir=str(tmp_path / "disk"),
            accelerator="cpu",
            max_concurrent_loads=2,
        ),
        store,
        replica="unit",
    )
    stalled = StalledReader(store)
    try:
        call = PredictCall(manifest=on_disk, inputs=[[0.0] * 4], request_id="a")
        await host.predict(call)
        for thread in threading.enumerate():
            if thread.name.startswith("disk-tier:"):
                thread.join(30)
        host.cache.unload(on_disk.key)
        store.reader = stalled
        stuck = [
            asyncio.create_task(
                host.predict(PredictCall(manifest=m, inputs=[[0.0] * 4], request_id=m.key))
            )
            for m in remote
        ]
        await asyncio.sleep(0.2)
        assert sorted(host.cache.loading_keys()) == sorted(m.key for m in remote)
        started = time.monotonic()
        response = await asyncio.wait_for(host.predict(call), 10)
        assert time.monotonic() - started < 2  # not the 5 s stall timeout
        assert not response.resident
        assert all(not task.done() for task in stuck)
        stalled.resume.set()
        await asyncio.gather(*stuck, return_exceptions=True)
    finally:
        stalled.resume.set()
        await host.close()
        store.close()
