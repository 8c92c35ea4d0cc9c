"""The registry: which model versions are published, cached in memory, refreshed in the back.

`Registry.refresh()` lists the store once and reads only manifests it has not seen (versions
are immutable, so a manifest never needs re-reading). `start()` refreshes every
`refresh_s` seconds in a background thread; `resolve()` answers from memory, so the request
path never lists S3. While the store is down the last good view keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from serve_app.errors import ModelNotFound, StorageUnavailable, VersionNotFound
from serve_app.schemas import ModelSummary
from serve_app.storage.manifest import (
    Manifest,
    validate_model_id,
    validate_version,
    version_sort_key,
)
from serve_app.storage.state_store import is_state_path
from serve_app.storage.store import ModelStore

logger = logging.getLogger(__name__)


class Registry:
    """In-memory view of the store's manifests (see module docstring)."""

    def __init__(
        self,
        store: ModelStore,
        refresh_s: float = 2.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """`on_change` runs (in the refreshing thread) after a refresh that changed the
        published versions, and after the first successful one: the ingress re-checks its
        routing there."""
        self.store = store
        self.refresh_s = refresh_s
        self.on_change = on_change
        self._by_path: dict[str, Manifest] = {}
        self._by_model: dict[str, dict[str, Manifest]] = {}
        self._refreshed_at: float | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def age_s(self) -> float | None:
        """Seconds since the last successful refresh (None before the first)."""
        return None if self._refreshed_at is None else time.monotonic() - self._refreshed_at

    def refresh(self) -> int:
        """List the store and read new manifests; return how many versions are known."""
        # NOTE: serving state (pins, the accepted routing) lives under <root>/_fleet/, which
        # no model id can name; it is never a model (see serve_app.storage.state_store).
        root = self.store.root
        paths = [p for p in self.store.list_manifest_paths() if not is_state_path(root, p)]
        new = self.store.read_manifests([p for p in paths if p not in self._by_path])
        fresh = {p: self._by_path.get(p) or new[p] for p in paths if p in self._by_path or p in new}
        by_model: dict[str, dict[str, Manifest]] = {}
        for manifest in fresh.values():
            by_model.setdefault(manifest.model_id, {})[manifest.version] = manifest
        changed = self._refreshed_at is None or fresh.keys() != self._by_path.keys()
        self._by_path, self._by_model = fresh, by_model
        self._refreshed_at = time.monotonic()
        self.last_error = None
        if changed and self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                logger.exception("registry change callback failed")
        return len(fresh)

    def refresh_quietly(self) -> bool:
        """One refresh; on a store outage keep the last good view and record the error."""
        try:
            self.refresh()
        except StorageUnavailable as exc:
            if self.last_error is None:
                logger.warning("registry refresh failed", extra={"error": str(exc)})
            self.last_error = str(exc)
            return False
        return True

    def start(self) -> None:
        """Refresh now, then every `refresh_s` seconds in a background thread."""
        if self._thread is not None:
            return
        self.refresh_quietly()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="registry-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background refresh."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh_quietly()

    @property
    def model_count(self) -> int:
        """Number of published models (any version)."""
        return len(self._by_model)

    def versions(self, model_id: str) -> list[str]:
        """Published versions of a model, oldest first."""
        return sorted(self._by_model.get(model_id, {}), key=version_sort_key)

    def resolve(self, model_id: str, version: str | None = None) -> Manifest:
        """The manifest of `model_id` at `version` (default: the latest version).

        Raises:
            InvalidModelId / InvalidVersion: malformed names (400).
            ModelNotFound / VersionNotFound: not published (404).
            StorageUnavailable: the registry has never been read (503).
        """
        validate_model_id(model_id)
        if version is not None:
            validate_version(version)
        if self._refreshed_at is None:
            raise StorageUnavailable(
                "the model registry has not been read from the store yet", retry_after_s=2.0
            )
        versions = self._by_model.get(model_id)
        if not versions:
            raise ModelNotFound(f"model {model_id!r} is not published")
        if version is None:
            version = max(versions, key=version_sort_key)
        manifest = versions.get(version)
        if manifest is None:
            raise VersionNotFound(
                f"model {model_id!r} has no version {version!r}; "
                f"published: {', '.join(self.versions(model_id))}"
            )
        return manifest

    def summaries(self) -> list[ModelSummary]:
        """One summary per model, sorted by id."""
        out = []
        for model_id in sorted(self._by_model):
            versions = self.versions(model_id)
            latest = self._by_model[model_id][versions[-1]]
            out.append(
                ModelSummary(
                    model_id=model_id,
                    latest_version=latest.version,
                    versions=versions,
                    task=latest.task,
                    format=latest.format,
                    size_bytes=latest.total_bytes,
                )
            )
        return out
