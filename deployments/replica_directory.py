"""Where replicas publish their state for the others: Ray's GCS key-value store.

Model-host replicas publish what they hold (budget, resident bytes, models) under
`<app>/hosts/<replica_id>` for `GET /v1/replicas`, with the Ray node they run on
(`node_identity`: node id, node IP, readable name); ingress replicas publish their stats
snapshots under `<app>/ingress/<replica_id>` so `GET /v1/stats` can merge all of them.
Entries are written on change and on a heartbeat; readers drop entries whose heartbeat is
older than `STALE_S`, so a dead replica disappears on its own. A replica that names its
actor is also checked by name on `read_replicas(check_alive=True)`, so one killed without
a goodbye (`ray.kill`) leaves such listings at once.

State that must outlive the cluster (pins, the accepted routing) is not kept here but in the
model store (`serve_app.storage.state_store`).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from deployments.ray_internals import SERVE_NAMESPACE, kv_delete, kv_get, kv_list, kv_put

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
# NOTE: the Ray node label `fleetserve up --workers` gives each local worker node
# (devstack.workers.NODE_LABEL); serving code cannot import devstack, hence the copy.
NODE_NAME_LABEL = "fleet-node"
HEAD_RESOURCE = "node:__internal_head__"
STALE_S = 10.0


def _prefix(app: str, kind: str) -> str:
    return f"{app}/{kind}/"


def node_identity() -> dict[str, str]:
    """The Ray node this process runs on: `node_id`, `node_ip` and a readable `node` name.

    The name is the node's `fleet-node` label (the local stack's `worker-<i>`), else `head`
    on the head node, else the node's hostname (the pod name on KubeRay). Empty outside Ray.
    """
    if not ray.is_initialized():
        return {}
    context = ray.get_runtime_context()
    node_id = context.get_node_id()
    info = next((n for n in ray.nodes() if n.get("NodeID") == node_id), {})
    labels = context.get_node_labels()
    name = labels.get(NODE_NAME_LABEL)
    if not name:
        is_head = HEAD_RESOURCE in info.get("Resources", {})
        name = "head" if is_head else info.get("NodeManagerHostname") or socket.gethostname()
    return {"node_id": node_id, "node_ip": ray.util.get_node_ip_address(), "node": str(name)}


class ReplicaPublisher:
    """Publishes one replica's state on change and on a heartbeat, from its own thread."""

    def __init__(
        self,
        app: str,
        kind: str,
        replica_id: str,
        source: Callable[[], dict[str, Any]] | None = None,
        interval_s: float = HEARTBEAT_S,
        on_heartbeat: Callable[[], None] | None = None,
        put: Callable[[str, str], None] = kv_put,
        actor_name: str | None = None,
    ) -> None:
        """`source`, if given, is polled from the publishing thread every `interval_s`
        (it must be thread-safe); otherwise the owner calls `publish()` on changes.
        `on_heartbeat` (thread-safe) runs on the same beat. `put(key, json)` writes the
        entry (Ray's GCS key-value store). `actor_name` (a Serve replica's actor, in
        Serve's namespace) lets readers check liveness by name."""
        self._key = _prefix(app, kind) + replica_id
        self._put = put
        self._actor = {"actor_name": actor_name, "namespace": SERVE_NAMESPACE} if actor_name else {}
        self.node = node_identity()
        self._write_lock = threading.Lock()
        self.failures = 0
        self._source = source
        self._on_heartbeat = on_heartbeat
        self._interval_s = interval_s
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

    def publish_now(self, status: dict[str, Any]) -> None:
        """Publish `status` and return once it is written (blocking: call from a thread),
        so a caller that answers after this sees its change in every listing."""
        with self._lock:
            self._status = status
        self._write()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(self._interval_s)
            self._dirty.clear()
            if self._stop.is_set():
                return
            # NOTE: one failed beat (a GCS hiccup, a failing callback) must not end the
            # thread: the replica would silently vanish from the directory for good.
            try:
                self._beat()
            except Exception:
                self.failures += 1
                logger.exception("replica directory heartbeat failed", extra={"key": self._key})

    def _beat(self) -> None:
        if self._on_heartbeat is not None:
            self._on_heartbeat()
        if self._source is not None:
            # NOTE: not `publish()`: that sets the dirty flag, and the loop would beat
            # again at once and spin (two ingress replicas each took ~0.4 cores, and
            # Ray's GCS another 0.4, writing stats snapshots back to back).
            status = self._source()
            with self._lock:
                self._status = status
        self._write()

    def _write(self) -> None:
        # NOTE: one writer at a time, each writing the newest status, so a slower writer
        # can never put an older status over a newer one.
        with self._write_lock:
            with self._lock:
                body = dict(self._status, **self._actor, **self.node, heartbeat=time.time())
            self._put(self._key, json.dumps(body))

    def stop(self) -> None:
        """Stop publishing (the entry stays until it goes stale)."""
        self._stop.set()
        self._dirty.set()
        self._thread.join(timeout=5)

    def close(self) -> None:
        """Stop publishing and remove this replica's entry."""
        self.stop()
        kv_delete(self._key)


def read_replicas(
    app: str, kind: str, exclude: str | None = None, check_alive: bool = False
) -> list[dict[str, Any]]:
    """Live replicas' published states (recent heartbeat), sorted by replica id.

    With `check_alive`, entries whose actor no longer exists are dropped at once (one GCS
    lookup per replica) instead of after `STALE_S`: a killed replica never says goodbye.
    """
    now = time.time()
    out = []
    for key in kv_list(_prefix(app, kind)):
        if exclude is not None and key.endswith("/" + exclude):
            continue
        raw = kv_get(key)
        if raw is None:
            continue
        body = json.loads(raw)
        if now - body.get("heartbeat", 0) > STALE_S:
            continue
        if check_alive and not _actor_alive(body):
            continue
        out.append(body)
    return sorted(out, key=lambda b: b.get("replica", ""))


def _actor_alive(body: dict[str, Any]) -> bool:
    name = body.get("actor_name")
    if not name:
        return True  # not published by a named actor: only the heartbeat can tell
    try:
        ray.get_actor(name, namespace=body.get("namespace"))
    except ValueError:
        return False
    return True
