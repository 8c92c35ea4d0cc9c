"""Where each model-host replica publishes what it holds, for `GET /v1/replicas` and tests.

Every replica writes a small JSON status (budget, resident bytes, models) under
`fleetserve/<app>/replicas/<replica_id>` in Ray's GCS key-value store on each cache change
and on a heartbeat; readers drop entries whose heartbeat is older than `STALE_S`, so a dead
replica disappears on its own.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from ray.experimental.internal_kv import (
    _internal_kv_del,
    _internal_kv_get,
    _internal_kv_list,
    _internal_kv_put,
)

HEARTBEAT_S = 2.0
STALE_S = 10.0
_NAMESPACE = "fleetserve"


def _prefix(app: str) -> str:
    return f"{app}/replicas/"


class ReplicaPublisher:
    """Publishes one replica's status now (on change) and every HEARTBEAT_S seconds."""

    def __init__(self, app: str, replica_id: str) -> None:
        self._key = _prefix(app) + replica_id
        self._status: dict[str, Any] = {"replica": replica_id}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-directory", daemon=True)
        self._thread.start()

    def publish(self, status: dict[str, Any]) -> None:
        """Publish `status` as soon as possible (called from the event loop on changes)."""
        with self._lock:
            self._status = status
        self._dirty.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(HEARTBEAT_S)
            self._dirty.clear()
            with self._lock:
                body = dict(self._status, heartbeat=time.time())
            _internal_kv_put(self._key, json.dumps(body), overwrite=True, namespace=_NAMESPACE)

    def close(self) -> None:
        """Stop publishing and remove this replica's entry."""
        self._stop.set()
        self._dirty.set()
        self._thread.join(timeout=5)
        _internal_kv_del(self._key, namespace=_NAMESPACE)


def read_replicas(app: str) -> list[dict[str, Any]]:
    """Live replicas' statuses (entries with a recent heartbeat), sorted by replica id."""
    now = time.time()
    out = []
    for key in _internal_kv_list(_prefix(app), namespace=_NAMESPACE):
        raw = _internal_kv_get(key, namespace=_NAMESPACE)
        if raw is None:
            continue
        body = json.loads(raw)
        if now - body.get("heartbeat", 0) <= STALE_S:
            out.append(body)
    return sorted(out, key=lambda b: b.get("replica", ""))
