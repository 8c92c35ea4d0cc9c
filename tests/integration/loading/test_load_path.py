"""The load path against the session's real SeaweedFS: a stuck download is cut off at its
deadline (issue 6 item 8), and a model evicted from memory reloads from the local disk tier,
also while S3 is down (stale-if-error)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.demo_fleet import write_fraud_model
from devstack.seaweed import SeaweedServer
from serve_app.config import HostConfig, StoreConfig
from serve_app.errors import StorageUnavailable
from serve_app.host.model_host import ModelHost
from serve_app.schemas import PredictCall
from serve_app.storage.publisher import publish_path
from serve_app.storage.store import ModelStore
from tests.support import wait_for


class TricklingProxy:
    """A TCP proxy to the real S3 server that, after `free_bytes` of a connection's response,
    forwards one byte every `every_s` seconds: never silent long enough for a socket read
    timeout, so only a download deadline can end the transfer."""

    def __init__(self, upstream: tuple[str, int], free_bytes: int, every_s: float) -> None:
        self.upstream, self.free_bytes, self.every_s = upstream, free_bytes, every_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, self.free_bytes), daemon=True
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, free: int | None) -> None:
        sent = 0
        try:
            while not self._closed.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if free is None or sent + len(data) <= free:
                    dst.sendall(data)
                    sent += len(data)
                    continue
                for i in range(len(data)):
                    if self._closed.wait(self.every_s):
                        return
                    dst.sendall(data[i : i + 1])
        except OSError:
            pass
        finally:
            src.close()
            dst.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


@pytest.fixture
def trickling_store(s3: SeaweedServer, store_config: StoreConfig) -> Iterator[ModelStore]:
    host, port = s3.endpoint_url.removeprefix("http://").split(":")
    proxy = TricklingProxy((host, int(port)), free_bytes=64 * 1024, every_s=0.2)
    config = store_config.model_copy(
        update={
            "endpoint_url": f"http://127.0.0.1:{proxy.port}",
            "read_timeout_s": 1.0,
            "download_timeout_s": 3.0,
            "retries": 0,
        }
    )
    store = ModelStore(config)
    yield store
    store.close()
    proxy.close()


def test_a_trickling_download_fails_at_its_deadline(
    store: ModelStore, trickling_store: ModelStore, tmp_path: Path
) -> None:
    manifest = publish_path(store, write_fraud_model(tmp_path / "m", 41), "trickle-model", "1")
    assert manifest.total_bytes > 10 * 2**20
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="download_timeout_s"):
        trickling_store.fetch(manifest)
    elapsed = time.monotonic() - started
    # the deadline (3 s) plus at most one socket read timeout (1 s) and some slack
    assert 2.5 < elapsed < 8, elapsed
    print(f"\ntrickling download cut off after {elapsed:.1f}s")


def _call(manifest, inputs) -> PredictCall:  # type: ignore[no-untyped-def]
    return PredictCall(manifest=manifest, inputs=inputs, request_id="it")


async def test_evicted_model_reloads_from_disk_while_s3_is_down(
    s3: SeaweedServer, store: ModelStore, tmp_path: Path
) -> None:
    first = publish_path(store, write_fraud_model(tmp_path / "a", 41), "tier-a", "1")
    second = publish_path(store, write_fraud_model(tmp_path / "b", 41, seed=7), "tier-b", "1")
    # room for one of the two models in memory, for both on disk
    budget = max(first.total_bytes, second.total_bytes) + 2**20
    config = HostConfig(
        memory_budget=budget,
        accelerator="cpu",
        disk_cache_dir=str(tmp_path / "disk"),
        disk_cache_bytes=4 * budget,
    )
    host = ModelHost(config, store, replica="it")
    try:
        inputs = [[0.25] * 32]
        expected = (await host.predict(_call(first, inputs))).outputs
        wait_for(lambda: host.loader.disk.read(first) is not None, 30, "the disk tier copy")
        assert not (await host.predict(_call(second, inputs))).resident
        assert "tier-a@1" in host.cache.stats.evicted_keys
        s3.stop()
        try:
            with pytest.raises(StorageUnavailable):
                store.read_manifest("tier-a", "1")
            started = time.monotonic()
            response = await host.predict(_call(first, inputs))
            reload_s = time.monotonic() - started
        finally:
            s3.start()
            s3.wait_ready(timeout_s=60)
        assert response.resident is False
        assert response.outputs == expected
        print(f"\nreloaded {first.total_bytes / 1e6:.1f} MB from disk in {reload_s:.3f}s, S3 down")
    finally:
        await host.close()
