"""Config pins of one pool: the routing's `pins`, resolved from the store, placed by its rules.

Every model-host deployment gets the routing as its Serve `user_config` (the same routing as
the Ingress: `build_app` gives it from `args.routing`, a `serve deploy` config gives it under
`deployments:`), and keeps resident the pins that the routing's rules place in its own pool.
A pin is `id`, `id@version` or an alias (all its arms); `routing.default_versions` fills in
a missing version. Hosts have no registry, so they resolve pins from the store themselves:

- a pin with a version is read once (`ModelStore.read_manifest`; versions are immutable);
- a pin without one follows the model's latest published version: one LIST under
  `<root>/<model_id>/` on every `refresh()`, and one manifest read when a new version shows;
- placement needs the manifest (rules match id globs or manifest tags), so every host
  resolves every pin of the routing and keeps those placed in its pool.

A routing the host cannot take is refused, as the Ingress refuses it, and the pins stay as
they were: a config that does not validate, or pins that name a model or version the store
does not have. A replica with nothing applied yet falls back to the routing the Ingress last
accepted (`serve_app.storage.state_store.AcceptedRouting`). A store that cannot be read
refuses nothing: unresolved pins keep their last manifest, and later refreshes retry them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from serve_app.config import RoutingConfig, describe_errors
from serve_app.errors import (
    FleetError,
    InvalidRouting,
    ModelNotFound,
    StorageUnavailable,
    VersionNotFound,
)
from serve_app.gateway.placement import Placement
from serve_app.gateway.routing_table import PinTarget, pin_targets
from serve_app.storage.manifest import MANIFEST_NAME, Manifest, validate_version, version_sort_key
from serve_app.storage.store import ModelStore, storage_errors

logger = logging.getLogger(__name__)


class ConfigPins:
    """The config pins of `pool` (see module docstring); blocking, one caller at a time."""

    def __init__(self, store: ModelStore, pool: str, pools: Sequence[str]) -> None:
        self.store = store
        self.pool = pool
        self.pools = list(pools) if pool in pools else [*pools, pool]
        self.routing: RoutingConfig | None = None
        self.errors: dict[str, str] = {}  # pin name -> why it is not (freshly) resolved
        self._targets: list[PinTarget] = []
        self._placement = Placement([], self.pools)
        self._manifests: dict[str, Manifest] = {}  # id@version -> manifest (immutable)
        self._resolved: dict[PinTarget, Manifest] = {}  # last good manifest of each target

    # ------------------------------------------------------------------ configure
    def configure(
        self, user_config: Any, accepted: Callable[[], Any] | None = None
    ) -> list[Manifest] | None:
        """Take the routing in `user_config`; returns this pool's pinned manifests, or None
        when it is refused (logged; the pins stay as they were). With nothing taken yet, a
        refusal falls back to `accepted()` (the routing the Ingress last accepted)."""
        try:
            return self._take(user_config)
        except InvalidRouting as exc:
            logger.error(
                "routing refused; config pins unchanged",
                extra={"pool": self.pool, "error": exc.message},
            )
            if self.routing is not None or accepted is None:
                return None
        try:
            fallback = accepted()
            if fallback is None:
                return None
            manifests = self._take(fallback)
        except (InvalidRouting, StorageUnavailable) as exc:
            logger.error(
                "no accepted routing to fall back to; no config pins",
                extra={"pool": self.pool, "error": str(exc)},
            )
            return None
        logger.warning("config pins from the last accepted routing", extra={"pool": self.pool})
        return manifests

    def _take(self, user_config: Any) -> list[Manifest]:
        try:
            routing = RoutingConfig.model_validate(user_config or {})
        except ValidationError as exc:
            raise InvalidRouting(f"routing config refused: {describe_errors(exc)}") from exc
        problems = routing.problems_with_pools(self.pools)
        try:
            targets = pin_targets(routing)
        except FleetError as exc:
            problems.append(f"pins: {exc}")
            targets = []
        if problems:
            raise InvalidRouting(f"routing config refused: {'; '.join(problems)}")
        resolved, errors, unknown = self._resolve(targets)
        if unknown:
            raise InvalidRouting(
                "routing config refused: pins point at unknown models or versions: "
                + "; ".join(unknown)
            )
        self.routing, self._targets, self.errors = routing, targets, errors
        self._placement = Placement(routing.rules, self.pools)
        self._resolved = resolved
        return self._mine()

    def refresh(self) -> list[Manifest]:
        """Resolve the pins again (new latest versions, pins the store could not be read
        for); returns this pool's pinned manifests."""
        resolved, errors, unknown = self._resolve(self._targets)
        self._resolved, self.errors = resolved, {**errors, **unknown}
        return self._mine()

    @property
    def needs_refresh(self) -> bool:
        """Whether a refresh can change anything (a pin follows the latest version, or one
        is not resolved); pins of fixed, resolved versions never change."""
        return any(t.version is None or t not in self._resolved for t in self._targets)

    def _mine(self) -> list[Manifest]:
        out: dict[str, Manifest] = {}
        for manifest in self._resolved.values():
            if self._placement.pool_for(manifest) == self.pool:
                out[manifest.key] = manifest
        return list(out.values())

    # ------------------------------------------------------------------ resolution
    def _resolve(
        self, targets: list[PinTarget]
    ) -> tuple[dict[PinTarget, Manifest], dict[str, str], dict[str, str]]:
        """(manifest by target, transient errors, unknown models) for `targets`; a target
        that fails keeps its last good manifest."""
        resolved: dict[PinTarget, Manifest] = {}
        errors: dict[str, str] = {}
        unknown: dict[str, str] = {}
        for target in targets:
            try:
                resolved[target] = self.resolve(target)
            except (ModelNotFound, VersionNotFound) as exc:
                unknown[target.name] = str(exc)
            except FleetError as exc:
                errors[target.name] = str(exc)
            else:
                continue
            if target in self._resolved:
                resolved[target] = self._resolved[target]
        return resolved, errors, unknown

    def resolve(self, target: PinTarget) -> Manifest:
        """The manifest `target` names now.

        Raises:
            ModelNotFound / VersionNotFound: the store has no such model or version.
            StorageUnavailable: the store could not be read.
        """
        if target.version is not None:
            return self._read(target.model_id, target.version)
        for version in self.versions(target.model_id)[::-1]:
            try:
                return self._read(target.model_id, version)
            except VersionNotFound:
                continue  # NOTE: the registry skips an unreadable manifest too
        raise ModelNotFound(f"model {target.model_id!r} is not published")

    def versions(self, model_id: str) -> list[str]:
        """Published versions of `model_id` (with a manifest), oldest first."""
        folder = f"{self.store.root}/{model_id}/"
        with storage_errors("listing a model's versions"):
            try:
                paths = self.store.fs.find(folder)
            except FileNotFoundError:
                paths = []
        out = []
        for path in paths:
            rel = path.lstrip("/").removeprefix(folder).split("/")
            if len(rel) != 2 or rel[1] != MANIFEST_NAME:
                continue
            try:
                out.append(validate_version(rel[0]))
            except FleetError:
                continue
        return sorted(out, key=version_sort_key)

    def _read(self, model_id: str, version: str) -> Manifest:
        key = f"{model_id}@{version}"
        if key not in self._manifests:
            try:
                self._manifests[key] = self.store.read_manifest(model_id, version)
            except FileNotFoundError:
                raise VersionNotFound(
                    f"model {model_id!r} has no published version {version!r}"
                ) from None
            except ValueError as exc:
                logger.warning("skipping invalid manifest", extra={"key": key, "error": str(exc)})
                raise VersionNotFound(f"{key} has no valid manifest in the store") from None
        return self._manifests[key]
