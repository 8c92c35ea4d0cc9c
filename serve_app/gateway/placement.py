"""Placement: which model-host pool serves a model, from the pool rules of the routing config.

Rules are tried in order; the first whose glob matches the model id (or whose tag is in the
manifest's tags) names the pool. A model no rule matches goes to the first declared pool.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from serve_app.gateway.routing_config import PoolRuleConfig
from serve_app.storage.manifest import Manifest


class Placement:
    """Maps manifests to pool names (see module docstring)."""

    def __init__(self, rules: Sequence[PoolRuleConfig], pools: Sequence[str]) -> None:
        if not pools:
            raise ValueError("at least one pool is needed")
        unknown = [r.pool for r in rules if r.pool not in pools]
        if unknown:
            raise ValueError(f"rules name undeclared pools: {', '.join(unknown)}")
        self.rules = tuple(rules)
        self.pools = tuple(pools)

    @property
    def default_pool(self) -> str:
        """Where models that match no rule go."""
        return self.pools[0]

    def pool_for(self, manifest: Manifest) -> str:
        """The pool that serves `manifest`."""
        for rule in self.rules:
            if rule.pattern is not None and fnmatch.fnmatchcase(manifest.model_id, rule.pattern):
                return rule.pool
            if rule.tag is not None and rule.tag in manifest.tags:
                return rule.pool
        return self.default_pool
