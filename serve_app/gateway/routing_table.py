"""The routing table: a validated `RoutingConfig` compiled against the pools and the registry.

It answers one question per request: for a requested name (`model_id`, `model_id@version`
or an alias), an optional explicit version and an optional sticky key, which manifest
serves it, in which pool, through which alias arm, and whether a shadow copy goes anywhere.

A table is built in one go and swapped in whole (`Gateway.set_routing`), so a request sees
either the old routing or the new one, never a mix.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from serve_app.config import PoolConfig, RoutingConfig
from serve_app.errors import FleetError, InvalidRouting, StorageUnavailable
from serve_app.gateway.placement import Placement
from serve_app.gateway.split import Arm, Split
from serve_app.storage.manifest import Manifest, validate_model_id, validate_version
from serve_app.storage.registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Where one request goes."""

    manifest: Manifest
    pool: str
    alias: str | None = None
    arm: str | None = None  # the arm's target as configured, e.g. "ranker@7"
    shadow: Manifest | None = None
    shadow_pool: str | None = None
    # NOTE: the alias's shadow target as configured, when it no longer resolves (removed
    # from the store): the request is served without its copy, which counts as dropped.
    shadow_missing: str | None = None


def parse_target(target: str) -> tuple[str, str | None]:
    """`model_id@version` -> (model_id, version); `model_id` -> (model_id, None).

    Raises:
        InvalidModelId / InvalidVersion (400) for malformed names.
    """
    model_id, sep, version = target.partition("@")
    validate_model_id(model_id)
    if sep:
        return model_id, validate_version(version)
    return model_id, None


@dataclass(frozen=True)
class PinTarget:
    """One model a routing pins: a fixed version, or (version None) the latest one."""

    model_id: str
    version: str | None = None

    @property
    def name(self) -> str:
        """`model_id@version`, or `model_id` for the latest version."""
        return self.model_id if self.version is None else f"{self.model_id}@{self.version}"


def pin_targets(routing: RoutingConfig) -> list[PinTarget]:
    """What `routing.pins` pins: aliases expanded to their arms, default versions applied.

    Raises:
        InvalidModelId / InvalidVersion: a malformed name (400).
    """
    out: dict[PinTarget, None] = {}
    for pin in routing.pins:
        alias = routing.aliases.get(pin)
        for target in [a.target for a in alias.arms] if alias is not None else [pin]:
            model_id, version = parse_target(target)
            version = version or routing.default_versions.get(model_id)
            out[PinTarget(model_id, version)] = None
    return list(out)


class RoutingTable:
    """Aliases, default versions, pool placement and pins, resolved against the registry."""

    def __init__(
        self,
        config: RoutingConfig,
        pools: Sequence[PoolConfig],
        registry: Registry,
        rng: random.Random | None = None,
    ) -> None:
        """Compile and validate `config`.

        Raises:
            InvalidRouting: with every problem found, each saying what to fix.
        """
        self.config = config
        self.registry = registry
        self.pools = {p.name: p for p in pools}
        self._rng = rng or random.Random()
        problems = config.problems_with_pools(list(self.pools))
        if problems:
            raise InvalidRouting("; ".join(problems))
        self.placement = Placement(config.rules, list(self.pools))
        self.splits = {
            name: Split(name, [Arm(a.target, a.weight) for a in alias.arms], self._rng)
            for name, alias in config.aliases.items()
        }
        problems = self._check_names()
        # NOTE: whether the targets were checked against the registry. A table built while
        # the registry was unreadable is not: `recheck()` checks it once the registry has
        # been read, and until then it is never recorded as the accepted routing.
        self.checked = False
        self.problems: list[str] = []
        if not problems and registry.age_s is not None:
            problems = self._check_against_registry()
            self.checked = not problems
        elif registry.age_s is None:
            logger.warning("routing checked without the registry: the store is not readable yet")
        if problems:
            raise InvalidRouting("; ".join(problems))

    def recheck(self) -> list[str]:
        """Check the targets and pins against the registry as it is now (after a refresh:
        versions come and go); returns the problems found, kept in `problems`.

        A table first checked here becomes `checked`; a table that was checked stays so
        (it was valid when accepted), and its problems are reported, not raised: requests
        for a vanished target get their 404, shadows of one are skipped.
        """
        if self.registry.age_s is None:
            return self.problems
        self.problems = self._check_against_registry()
        if not self.problems:
            self.checked = True
        return self.problems

    # ------------------------------------------------------------------ validation
    def _targets(self) -> list[tuple[str, str]]:
        """(where, target) for every model reference in the config."""
        refs = []
        for name, alias in self.config.aliases.items():
            refs.extend((f"alias {name!r} arm {a.target!r}", a.target) for a in alias.arms)
            if alias.shadow is not None:
                refs.append((f"alias {name!r} shadow", alias.shadow.target))
        refs.extend(
            (f"default_versions[{m!r}]", f"{m}@{v}")
            for m, v in self.config.default_versions.items()
        )
        refs.extend((f"pin {p!r}", p) for p in self.config.pins if p not in self.config.aliases)
        return refs

    def _check_names(self) -> list[str]:
        problems = []
        for name in self.config.aliases:
            try:
                validate_model_id(name)
            except FleetError as exc:
                problems.append(f"alias name {name!r}: {exc}")
        for where, target in self._targets():
            try:
                model_id, _ = parse_target(target)
            except FleetError as exc:
                problems.append(f"{where}: {exc}")
                continue
            if model_id in self.config.aliases and "@" not in target and "arm" in where:
                problems.append(f"{where}: arms must name models, not other aliases")
        return problems

    def _check_against_registry(self) -> list[str]:
        problems = []
        for where, target in self._targets():
            try:
                self._manifest(target)
            except FleetError as exc:
                problems.append(f"{where} points at an unknown model or version: {exc}")
        if problems:
            return problems
        for pool, manifests in self.pins_by_pool().items():
            budget = self.pools[pool].memory_budget
            need = sum(m.total_bytes for m in manifests)
            if budget is not None and need > budget:
                problems.append(
                    f"pins for pool {pool!r} need {need / 1e6:.1f} MB "
                    f"({', '.join(m.key for m in manifests)}), more than its memory budget of "
                    f"{budget / 1e6:.1f} MB per replica: pin fewer models or raise the "
                    "pool's memory_budget"
                )
        return problems

    # ------------------------------------------------------------------ resolution
    def _manifest(self, target: str, version: str | None = None) -> Manifest:
        model_id, named = parse_target(target)
        version = version or named or self.config.default_versions.get(model_id)
        return self.registry.resolve(model_id, version)

    def resolve(self, name: str, version: str | None = None, key: str | None = None) -> Route:
        """The route of a request for `name` (see module docstring).

        Raises:
            FleetError: 400 for malformed names, 404 for unknown models or versions.
        """
        model_id, named = parse_target(name)
        if named is not None and version is not None and named != version:
            raise InvalidRouting(f"{name!r} names version {named!r} but {version!r} was asked")
        version = version or named
        split = self.splits.get(model_id) if version is None else None
        if split is None:
            manifest = self._manifest(model_id, version)
            return Route(manifest, self.placement.pool_for(manifest))
        arm = split.choose(key)
        manifest = self._manifest(arm.target)
        shadow = self.config.aliases[model_id].shadow
        shadow_manifest: Manifest | None = None
        shadow_missing: str | None = None
        if shadow is not None and (shadow.fraction >= 1 or self._rng.random() < shadow.fraction):
            try:
                shadow_manifest = self._manifest(shadow.target)
            except FleetError:
                # NOTE: a shadow never fails the request it copies (its target was removed
                # from the store, or the registry lost it): served without the copy.
                shadow_missing = shadow.target
        return Route(
            manifest,
            self.placement.pool_for(manifest),
            alias=model_id,
            arm=arm.target,
            shadow=shadow_manifest,
            shadow_pool=None
            if shadow_manifest is None
            else self.placement.pool_for(shadow_manifest),
            shadow_missing=shadow_missing,
        )

    def sticky_header(self, name: str) -> str | None:
        """The header whose value keeps a caller on one arm of alias `name` (None if `name`
        is not an alias)."""
        alias = self.config.aliases.get(name.partition("@")[0])
        if alias is None:
            return None
        return alias.sticky_header or self.config.sticky_header

    def pins_by_pool(self) -> dict[str, list[Manifest]]:
        """The pinned manifests of each pool (aliases pin all their arms).

        Raises:
            StorageUnavailable: the registry has not been read yet.
            FleetError: a pin names an unknown model (checked at construction).
        """
        if self.registry.age_s is None:
            raise StorageUnavailable("the registry has not been read yet", retry_after_s=2.0)
        out: dict[str, dict[str, Manifest]] = {}
        for target in pin_targets(self.config):
            manifest = self.registry.resolve(target.model_id, target.version)
            out.setdefault(self.placement.pool_for(manifest), {})[manifest.key] = manifest
        return {pool: list(by_key.values()) for pool, by_key in out.items()}
