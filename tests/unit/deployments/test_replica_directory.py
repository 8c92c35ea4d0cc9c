"""The replica directory's heartbeat survives failing writes and callbacks."""

from __future__ import annotations

import itertools
import json
import threading
import time

from deployments.replica_directory import ReplicaPublisher
from tests.support import wait_for


def test_heartbeat_keeps_going_after_failures() -> None:
    written: list[dict] = []
    calls = {"put": 0, "beat": 0}
    lock = threading.Lock()

    def put(key: str, value: str) -> None:
        with lock:
            calls["put"] += 1
            if calls["put"] <= 2:
                raise ConnectionError("GCS unavailable")
            written.append(json.loads(value))

    def on_heartbeat() -> None:
        calls["beat"] += 1
        if calls["beat"] == 4:
            raise RuntimeError("gauge bug")

    publisher = ReplicaPublisher(
        "app", "hosts", "r1", interval_s=0.01, on_heartbeat=on_heartbeat, put=put
    )
    try:
        publisher.publish({"replica": "r1", "models": ["m@1"]})
        wait_for(lambda: len(written) >= 3, 10, "heartbeats after the failures")
    finally:
        publisher.stop()
    assert publisher.failures == 3
    assert written[-1]["models"] == ["m@1"]


def test_a_polled_source_is_written_once_per_interval_not_back_to_back() -> None:
    """A publisher with a `source` used to re-arm itself on every beat and spin."""
    writes: list[float] = []
    publisher = ReplicaPublisher(
        "app",
        "ingress",
        "r1",
        source=lambda: {"replica": "r1", "models": {}},
        interval_s=0.2,
        put=lambda key, value: writes.append(time.monotonic()),
    )
    try:
        wait_for(lambda: len(writes) >= 3, 10, "three heartbeats")
    finally:
        publisher.stop()
    gaps = [b - a for a, b in itertools.pairwise(writes)]
    assert min(gaps) >= 0.15, gaps
