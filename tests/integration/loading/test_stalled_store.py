"""A stalled store is a bounded wait (issue 15 item 4), against a SeaweedFS of this test's
own: stalled with SIGSTOP (it accepts connections and never answers) and then stopped.

A version in the local disk tier loads from disk without waiting on S3; any other load gets
a typed 503 with Retry-After after `store.stall_timeout_s`, while the registry keeps
resolving from its last good view. Before the fix the cold request for a version not on
disk waited for the socket read timeout of every retry (60 s x 3), and a request waited on
its load for as long as the load took.
"""

from __future__ import annotations

import asyncio
import os
import signal
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
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore, wait_for_store
from tests.support import wait_for

STALL_S = 3.0  # store.stall_timeout_s here (default 20)
INPUTS = [[0.25] * 32]


class OwnSeaweed:
    """A SeaweedFS only this test signals: SIGSTOP/SIGCONT its process group, stop it."""

    def __init__(self, server: SeaweedServer) -> None:
        self.server = server
        self.stalled = False

    def stall(self) -> None:
        assert self.server.pid is not None
        assert self.server.is_running()
        os.killpg(self.server.pid, signal.SIGSTOP)
        self.stalled = True

    def resume(self) -> None:
        if self.stalled and self.server.pid is not None and self.server.is_running():
            os.killpg(self.server.pid, signal.SIGCONT)
        self.stalled = False


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[OwnSeaweed]:
    server = SeaweedServer(tmp_path / "weed")
    server.start()
    own = OwnSeaweed(server)
    try:
        server.wait_ready(timeout_s=60)
        yield own
    finally:
        own.resume()  # NOTE: a stopped process cannot act on SIGTERM
        server.stop()


def _store(server: SeaweedServer) -> ModelStore:
    # NOTE: the default read timeout (60 s) and retries (2): only the stall watchdog cuts.
    return ModelStore(
        StoreConfig(
            url="s3://fleet/stall",
            endpoint_url=server.endpoint_url,
            access_key_id=server.access_key,
            secret_access_key=server.secret_key,
            stall_timeout_s=STALL_S,
        )
    )


async def _timed(host: ModelHost, call: PredictCall) -> tuple[float, object]:
    """(seconds, response or the error raised); gives up at 60 s so a hang fails the test."""
    started = time.monotonic()
    try:
        outcome: object = await asyncio.wait_for(host.predict(call), 60)
    except (StorageUnavailable, TimeoutError) as exc:
        outcome = exc
    return time.monotonic() - started, outcome


async def test_stalled_then_stopped_store_disk_tier_serves_the_rest_get_503(
    own_s3: OwnSeaweed, tmp_path: Path
) -> None:
    store = _store(own_s3.server)
    wait_for_store(store)
    on_disk = publish_path(store, write_fraud_model(tmp_path / "a", 41), "stall-a", "1")
    remote = publish_path(store, write_fraud_model(tmp_path / "b", 41, seed=7), "stall-b", "1")
    registry = Registry(store, refresh_s=60)
    registry.refresh()
    config = HostConfig(
        memory_budget=4 * on_disk.total_bytes,
        accelerator="cpu",
        disk_cache_dir=str(tmp_path / "disk"),
        failure_ttl_s=0,  # NOTE: every request below really tries the store
        load_timeout_s=30,
    )
    host = ModelHost(config, store, replica="stall")
    try:
        a = PredictCall(manifest=registry.resolve("stall-a"), inputs=INPUTS, request_id="a")
        expected = (await host.predict(a)).outputs
        wait_for(lambda: host.loader.disk.has(on_disk), 30, "the disk tier copy of stall-a")
        host.cache.unload(on_disk.key)

        results: dict[str, float] = {}
        for state in ("stalled", "stopped"):
            if state == "stalled":
                own_s3.stall()
            else:
                own_s3.resume()
                own_s3.server.stop()
            # the registry's last good view still resolves, latest version included
            assert registry.resolve("stall-b") == remote
            b = PredictCall(manifest=registry.resolve("stall-b"), inputs=INPUTS, request_id="b")
            disk_s, response = await _timed(host, a)
            assert not isinstance(response, BaseException), response
            assert response.outputs == expected
            assert not response.resident
            host.cache.unload(on_disk.key)
            cold_s, error = await _timed(host, b)
            assert isinstance(error, StorageUnavailable), f"{state}: {error!r} after {cold_s:.1f}s"
            assert error.status_code == 503
            assert error.retry_after_s
            assert cold_s < STALL_S + 5, f"{state}: 503 after {cold_s:.1f}s"
            results[f"{state}: disk-tier load s"] = disk_s
            results[f"{state}: 503 after s"] = cold_s
        assert results["stalled: disk-tier load s"] < STALL_S  # never waits on the store
        print("\n" + ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
    finally:
        await host.close()
        store.close()
