"""Every use of Ray's internals in fleetserve, in one place (Ray 2.60).

No other module in `serve_app/` or `deployments/` may import `ray._private`,
`ray.serve._private`, `ray.experimental.internal_kv` or `ray.serve.context._get_global_client`
(`tests/unit/test_ray_internals.py` checks that, and that each symbol below still exists with
the shape used here). When a Ray upgrade moves one, that test names it; fix it here only.

- `push_model_ids` -- `ray.serve.context._get_global_client().record_request_routing_info(
  RequestRoutingInfo(...))` (`RequestRoutingInfo` from `ray.serve._private.common`). It tells
  Serve's controller which model ids a replica holds, so the routers' `RunningReplica.
  multiplexed_model_ids` follow it. Why no public form: the only public producer is
  `@serve.multiplexed`, whose wrapper keeps its own count-bounded LRU of loaded models and
  pushes that; our cache evicts by measured bytes, pins, leases and loads in flight, so it
  must report its own keys -- the same controller call the wrapper makes
  (`ray/serve/multiplex.py`, `_push_model_ids_info`). If Ray moves it: follow what
  `multiplex.py` calls in the new version. If Ray makes `record_routing_stats` carry model ids
  or gives `serve.multiplexed` an external-cache mode, switch to that and delete this.
- `kv_get`, `kv_put`, `kv_delete`, `kv_list` -- Ray's GCS key-value store
  (`ray.experimental.internal_kv._internal_kv_*`), under the `fleetserve` namespace. The
  replica directory (`deployments.replica_directory`: `GET /v1/replicas`, `/v1/stats`) lives
  there because it outlives every replica, needs no actor of its own and is gone with the
  cluster (it is live state, not data to keep). Why no public form: Ray 2.60 has
  no public key-value API (`internal_kv` is experimental and its functions are underscored;
  Ray's own dashboard, job and Serve code use it). If Ray moves it: use whatever Ray's job
  manager (`ray/dashboard/modules/job`) uses for its KV in that version, or replace the store
  with a detached named actor holding a dict (same four operations).
- `SERVE_NAMESPACE` -- the Ray namespace Serve creates replica actors in
  (`ray.serve._private.constants`), so a reader can `ray.get_actor(name, namespace=...)` a
  replica to check that it still lives. Why no public form: Serve documents no namespace
  constant. If Ray moves it: take it from where Serve's controller names its actors, or from
  `ray.get_runtime_context().namespace` inside a replica (which is the same value).
- `SERVE_THROUGHPUT_ENV` -- the per-process settings of Ray Serve's
  `RAY_SERVE_THROUGHPUT_OPTIMIZED` mode (`ray.serve._private.constants` reads each name),
  which `deployments/builder.py` gives our replicas as runtime_env variables unless the
  config's `serve_env` says otherwise: Serve's request handling, the handle's router and our
  code share one event loop instead of handing every request between threads, and the
  objects a replica builds at start are frozen out of the GC's scans (docs/benchmarks.md,
  T1). Why no public form: Serve documents only the cluster-wide flag, which also turns on
  direct ingress and gRPC for every application. If Ray renames one: use the new name from
  `constants.py`; an unknown variable is ignored, so nothing breaks, it only stops helping.
"""

from __future__ import annotations

from collections.abc import Sequence

from ray.experimental.internal_kv import (
    _internal_kv_del,
    _internal_kv_get,
    _internal_kv_list,
    _internal_kv_put,
)
from ray.serve._private.common import RequestRoutingInfo
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.context import _get_global_client
from ray.serve.request_router import ReplicaID

__all__ = [
    "KV_NAMESPACE",
    "SERVE_NAMESPACE",
    "SERVE_THROUGHPUT_ENV",
    "kv_delete",
    "kv_get",
    "kv_list",
    "kv_put",
    "push_model_ids",
]

KV_NAMESPACE = "fleetserve"
SERVE_THROUGHPUT_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


def push_model_ids(replica_id: ReplicaID, keys: Sequence[str]) -> None:
    """Tell Serve's controller that `replica_id` holds (or is loading) exactly `keys`.

    Fire-and-forget (an actor call to the controller); the controller rebroadcasts the
    replica set to every router of the deployment.
    """
    _get_global_client().record_request_routing_info(
        RequestRoutingInfo(replica_id=replica_id, multiplexed_model_ids=list(keys))
    )


def kv_get(key: str, namespace: str = KV_NAMESPACE) -> bytes | None:
    """The value at `key`, or None."""
    return _internal_kv_get(key, namespace=namespace)


def kv_put(key: str, value: str | bytes, namespace: str = KV_NAMESPACE) -> None:
    """Write `value` at `key`, replacing what was there."""
    _internal_kv_put(key, value, overwrite=True, namespace=namespace)


def kv_delete(key: str, namespace: str = KV_NAMESPACE) -> None:
    """Remove `key` (no error if it is absent)."""
    _internal_kv_del(key, namespace=namespace)


def kv_list(prefix: str, namespace: str = KV_NAMESPACE) -> list[str]:
    """Every key that starts with `prefix`, decoded."""
    return [k.decode() for k in _internal_kv_list(prefix, namespace=namespace)]
