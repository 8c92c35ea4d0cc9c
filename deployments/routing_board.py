"""Where the ingress posts routing state for other replicas: Ray's GCS key-value store.

- `<app>/config-pins/<pool>`: the pinned manifests of a pool (config pins; the management
  API's pins live apart, under `<app>/pins/`, see serve_app.management.pins). The routing (and so the
  pin list) is Serve `user_config` of the Ingress; model hosts of a pool read their key
  when they start and poll it after, so a `serve deploy` that changes pins reaches every
  host replica without restarting any of them. The value holds the manifests (hosts
  have no registry).
- `<app>/routing/accepted`: the last routing config an ingress accepted, so an ingress
  replica started later with a refused config keeps serving the accepted one.
"""

from __future__ import annotations

import json
from typing import Any

from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

from serve_app.storage.manifest import Manifest

_NAMESPACE = "fleetserve"


def _key(app: str, pool: str) -> str:
    return f"{app}/config-pins/{pool}"


def post_pins(app: str, pool: str, manifests: list[Manifest]) -> str:
    """Publish the pins of `pool`; returns the posted value (to skip identical re-posts)."""
    body = json.dumps([m.model_dump(mode="json") for m in sorted(manifests, key=lambda m: m.key)])
    _internal_kv_put(_key(app, pool), body, overwrite=True, namespace=_NAMESPACE)
    return body


def save_accepted(app: str, config: dict[str, Any]) -> None:
    """Record the routing config an ingress accepted."""
    body = json.dumps(config, sort_keys=True)
    _internal_kv_put(f"{app}/routing/accepted", body, overwrite=True, namespace=_NAMESPACE)


def read_accepted(app: str) -> dict[str, Any] | None:
    """The last accepted routing config, or None."""
    raw = _internal_kv_get(f"{app}/routing/accepted", namespace=_NAMESPACE)
    return None if raw is None else json.loads(raw)


def read_pins(app: str, pool: str) -> tuple[str, list[Manifest]] | None:
    """The posted value and pins of `pool`, or None if nothing was ever posted."""
    raw = _internal_kv_get(_key(app, pool), namespace=_NAMESPACE)
    if raw is None:
        return None
    text = raw.decode()
    return text, [Manifest.model_validate(m) for m in json.loads(text)]
