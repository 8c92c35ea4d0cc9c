"""Config of the routing (the Ingress's and hosts' Serve `user_config`): aliases and their
A/B arms, shadows, default versions, pool rules and pins. Kept apart from serve_app.config
(which imports and re-exports it) so the routing's rules live with the routing; validated
as strictly (unknown keys fail the deploy)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["AliasConfig", "ArmConfig", "PoolRuleConfig", "RoutingConfig", "ShadowConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArmConfig(_Strict):
    """One arm of an alias: a model id (its default version) or `model_id@version`."""

    target: str = Field(description="`model_id` or `model_id@version`.")
    weight: float = Field(ge=0, le=100, description="Percent of the alias's traffic.")


class ShadowConfig(_Strict):
    """A candidate that gets a copy of an alias's traffic; its answers are discarded."""

    target: str = Field(description="`model_id` or `model_id@version`.")
    fraction: float = Field(1.0, gt=0, le=1, description="Share of requests copied.")


class AliasConfig(_Strict):
    """A logical model name split between arms by weight (sticky per caller key)."""

    arms: list[ArmConfig] = Field(min_length=1)
    sticky_header: str | None = Field(
        None, description="Header holding the sticky key; default: routing.sticky_header."
    )
    shadow: ShadowConfig | None = None

    @model_validator(mode="after")
    def _weights_sum_to_100(self) -> AliasConfig:
        total = sum(arm.weight for arm in self.arms)
        if abs(total - 100) > 1e-6:
            raise ValueError(
                f"arm weights add up to {total:g}, not 100: change them so they sum to 100"
            )
        return self


class PoolRuleConfig(_Strict):
    """Send models whose id matches `pattern` (glob), or whose manifest has `tag`, to `pool`."""

    pool: str
    pattern: str | None = Field(None, description="fnmatch glob over model ids, e.g. fraud-*.")
    tag: str | None = Field(None, description="A tag from the model's manifest.")

    @model_validator(mode="after")
    def _one_matcher(self) -> PoolRuleConfig:
        if (self.pattern is None) == (self.tag is None):
            raise ValueError(f"a rule for pool {self.pool!r} needs exactly one of pattern or tag")
        return self


class RoutingConfig(_Strict):
    """What changes live (Serve `user_config` of the Ingress): aliases and their splits,
    default versions, pool rules and pins. `serve deploy` with a changed routing applies it
    through `reconfigure()`: no replica restarts, no reloads of models that stay put."""

    sticky_header: str = Field("X-User-Id", description="Default header of sticky keys.")
    aliases: dict[str, AliasConfig] = Field(default_factory=dict)
    default_versions: dict[str, str] = Field(
        default_factory=dict, description="model_id -> version served when none is named."
    )
    rules: list[PoolRuleConfig] = Field(
        default_factory=list, description="First match wins; unmatched models: first pool."
    )
    pins: list[str] = Field(
        default_factory=list,
        description="Models (`id`, `id@version`) or aliases (all arms) kept resident.",
    )
    shadow_max_inflight: int = Field(
        8, ge=1, description="Shadow copies in flight per ingress replica; more are dropped."
    )

    def problems_with_pools(self, pools: list[str]) -> list[str]:
        """What in this routing does not fit the declared pools (empty if all is well)."""
        return [
            f"rules[{i}] ({rule.pattern or 'tag ' + repr(rule.tag)}) sends models to pool "
            f"{rule.pool!r}, which is not declared; declared pools: {', '.join(pools)}"
            for i, rule in enumerate(self.rules)
            if rule.pool not in pools
        ]
