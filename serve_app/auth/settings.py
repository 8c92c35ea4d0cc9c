"""Config of tenants (`auth:` in the app's args): names, key hashes or key sources, scopes
and limits. Kept apart from serve_app.config (which imports it) so the key rules live with
the keys; validated as strictly (unknown keys fail the deploy)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIN_KEY_LENGTH = 16  # characters of any admin or tenant key (shorter: refused at deploy)
KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
RESERVED_PRINCIPALS = ("admin", "anonymous")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantConfig(_Strict):
    """One tenant: its API keys (as hashes, or plain from env vars / files) and the models
    it may call. Keys never appear in config text: `key_hashes` holds `sha256:<hex>` of each
    key (`fleetserve hash-key`), `key_env`/`key_files` name where the ingress reads plain
    keys at start."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$", description="Tenant name (a metrics label)."
    )
    key_hashes: list[Annotated[str, Field(pattern=KEY_HASH_PATTERN)]] = Field(
        default_factory=list, description="`sha256:<64 hex>` of each key."
    )
    key_env: list[str] = Field(
        default_factory=list, description="Environment variables (of the ingress) holding keys."
    )
    key_files: list[str] = Field(
        default_factory=list, description="Files (on the ingress's node) holding one key each."
    )
    models: list[str] = Field(
        default_factory=list, description="fnmatch globs over model ids (not aliases)."
    )
    tags: list[str] = Field(
        default_factory=list, description="Models whose manifest carries one of these tags."
    )
    aliases: list[str] = Field(
        default_factory=list, description="Aliases (routing.aliases) the tenant may call."
    )
    rate_per_s: float | None = Field(
        None, gt=0, description="Requests per second per ingress replica; None: no limit."
    )
    burst: int | None = Field(
        None, ge=1, description="Requests above the rate allowed at once; default: rate, >= 1."
    )
    max_cold_loads: int | None = Field(
        4, ge=1, description="Cold loads (distinct models) in flight at once; None: no cap."
    )

    @model_validator(mode="after")
    def _has_a_key(self) -> TenantConfig:
        if not (self.key_hashes or self.key_env or self.key_files):
            raise ValueError(
                f"tenant {self.name!r} has no key: give key_hashes, key_env or key_files"
            )
        if self.name in RESERVED_PRINCIPALS:
            raise ValueError(f"tenant name {self.name!r} is reserved")
        return self


class AuthConfig(_Strict):
    """Tenants of the inference API. With none (the default) inference is open, as it is
    on the loopback-bound local stack; with any, every inference route needs a key."""

    tenants: list[TenantConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> AuthConfig:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names must be unique; got {', '.join(names)}")
        return self
