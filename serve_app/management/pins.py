"""The pin store: which model versions must stay resident, kept outside any replica.

A pin is desired state. It lives in a small key-value store (in Serve: the model store
itself, `serve_app.storage.state_store.StoreKeyValue` under `<root>/_fleet/`, which outlives
every replica and the Ray cluster) under `<app>/pins/<model_id>@<version>`, one JSON record
each. Model-host replicas apply every pin on start and on their heartbeat (pin in the cache,
then load), and release pins that disappeared, so a restarted replica gets its pins back. The
record carries the manifest, so a host can load the model without the registry.

A pinned model is resident on every replica of the pool; `source` says who asked for it
(`api` for the management API, `config` for pins declared in config.yaml).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import DEFAULT_POOL
from serve_app.storage.manifest import Manifest

logger = logging.getLogger(__name__)


class KeyValue(Protocol):
    """The few key-value operations the pin store needs (thread-safe, blocking)."""

    def get(self, key: str) -> bytes | None:
        """The value at `key`, or None."""
        ...

    def put(self, key: str, value: bytes) -> None:
        """Write `value` at `key` (overwrite)."""
        ...

    def delete(self, key: str) -> None:
        """Remove `key` (no error if absent)."""
        ...

    def keys(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix`."""
        ...


class MemoryKeyValue:
    """A `KeyValue` in process memory (one-process setups and tests)."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        """The value at `key`, or None."""
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, value: bytes) -> None:
        """Write `value` at `key`."""
        with self._lock:
            self._data[key] = value

    def delete(self, key: str) -> None:
        """Remove `key`."""
        with self._lock:
            self._data.pop(key, None)

    def keys(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix`."""
        with self._lock:
            return [k for k in self._data if k.startswith(prefix)]


class PinRecord(BaseModel):
    """One pinned model version."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    manifest: Manifest
    source: Literal["api", "config"] = "api"
    pool: str = Field(DEFAULT_POOL, description="The pool whose replicas hold the pin.")
    pinned_at: float = Field(default_factory=time.time, description="Unix time.")

    @property
    def key(self) -> str:
        """`model_id@version`."""
        return self.manifest.key


class PinStore:
    """Pin records of one application in a `KeyValue` store."""

    def __init__(self, kv: KeyValue, app: str) -> None:
        self._kv = kv
        self._prefix = f"{app}/pins/"

    def put(self, record: PinRecord) -> None:
        """Add or replace the pin of `record.key`."""
        self._kv.put(self._prefix + record.key, record.model_dump_json().encode())

    def delete(self, key: str) -> bool:
        """Remove the pin of `key`; returns whether there was one."""
        existed = self._kv.get(self._prefix + key) is not None
        self._kv.delete(self._prefix + key)
        return existed

    def get(self, key: str) -> PinRecord | None:
        """The pin of `key`, if any."""
        raw = self._kv.get(self._prefix + key)
        return None if raw is None else PinRecord.model_validate(json.loads(raw))

    def list(self) -> list[PinRecord]:
        """Every pin, oldest first."""
        records = []
        for key in self._kv.keys(self._prefix):
            raw = self._kv.get(key)
            if raw is None:
                continue
            try:
                records.append(PinRecord.model_validate(json.loads(raw)))
            except ValueError:
                # NOTE: one bad record must not stop every other pin from applying.
                logger.warning("skipping unreadable pin record", extra={"key": key})
        return sorted(records, key=lambda r: (r.pinned_at, r.key))
