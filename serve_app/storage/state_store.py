"""Small state records in the model store itself, where any restart finds them.

The serving state that must outlive every replica, and the Ray cluster too, lives beside the
models, under `<store root>/_fleet/`, one object per key:

    _fleet/<app>/pins/<model_id>@<version>   a pin of the management API (PinStore)
    _fleet/<app>/routing/accepted            the last routing config an ingress accepted

Model ids start with a letter or a digit, so `_fleet` can never be a model's folder, and the
registry skips it (`is_state_path`). `StoreKeyValue` is the `KeyValue` of
`serve_app.management.pins` over the store's filesystem (s3fs in Serve, fsspec's memory
filesystem in unit tests); its calls block, so async callers run them in a thread. Failures
of the store are `StorageUnavailable` (503), as for every other read of the store.

Cost: every call is one S3 request (a `keys()` is one LIST page per 1,000 keys); model-host
replicas list the pins every few seconds (deployments/model_host.py, `PIN_SYNC_S`).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Protocol

import fsspec

from serve_app.storage.store import ModelStore, storage_errors

STATE_DIR = "_fleet"


def is_state_path(root: str, path: str) -> bool:
    """Whether `path` (as the store lists it) is a state record, not part of a model."""
    return path.lstrip("/").removeprefix(root + "/").startswith(STATE_DIR + "/")


class StoreKeyValue:
    """`serve_app.management.pins.KeyValue` over the model store, under `<root>/_fleet/`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self._fs = fs
        self._base = f"{root}/{STATE_DIR}"

    @classmethod
    def of(cls, store: ModelStore) -> StoreKeyValue:
        """The state records kept in `store` (same bucket, prefix and credentials)."""
        return cls(store.fs, store.root)

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if any(p in ("", ".", "..") or "\\" in p for p in parts):
            raise ValueError(f"not a state key: {key[:80]!r}")
        return f"{self._base}/{key}"

    def get(self, key: str) -> bytes | None:
        """The value at `key`, or None.

        Raises:
            StorageUnavailable: the store could not be read.
        """
        path = self._path(key)
        with storage_errors("reading serving state"):
            try:
                return bytes(self._fs.cat_file(path))
            except FileNotFoundError:
                return None

    def put(self, key: str, value: bytes) -> None:
        """Write `value` at `key` (one PUT: readers see the old value or the new one).

        Raises:
            StorageUnavailable: the store could not be written.
        """
        path = self._path(key)
        with storage_errors("writing serving state"):
            self._fs.pipe_file(path, value)

    def delete(self, key: str) -> None:
        """Remove `key` (no error if absent).

        Raises:
            StorageUnavailable: the store could not be written.
        """
        path = self._path(key)
        with storage_errors("deleting serving state"), contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(path)

    def keys(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix`, sorted.

        Raises:
            StorageUnavailable: the store could not be listed.
        """
        folder = prefix.rpartition("/")[0]
        under = self._path(folder) if folder else self._base
        with storage_errors("listing serving state"):
            try:
                paths = self._fs.find(under)
            except FileNotFoundError:
                return []
        base = self._base.lstrip("/") + "/"
        keys = (p.lstrip("/").removeprefix(base) for p in paths)
        return sorted(k for k in keys if k.startswith(prefix))


class _Records(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...


class AcceptedRouting:
    """The last routing config an ingress of `app` accepted (`<app>/routing/accepted`), so a
    replica started with a refused config keeps serving (or pinning) the accepted one."""

    def __init__(self, kv: _Records, app: str) -> None:
        self._kv = kv
        self._key = f"{app}/routing/accepted"

    def save(self, config: dict[str, Any]) -> None:
        """Record an accepted routing config (blocking)."""
        self._kv.put(self._key, json.dumps(config, sort_keys=True).encode())

    def read(self) -> dict[str, Any] | None:
        """The last accepted routing config, or None (blocking).

        Raises:
            StorageUnavailable: the store could not be read.
        """
        raw = self._kv.get(self._key)
        if raw is None:
            return None
        try:
            config = json.loads(raw)
        except ValueError:
            return None  # NOTE: a damaged record is as good as none; the next accept rewrites it
        return config if isinstance(config, dict) else None
