"""Configuration of a fleet application: one pydantic model, validated strictly.

The same `AppConfig` is the `args:` block of `config.yaml` (validated by the Serve builder)
and what tests, notebooks and the CLI load with `load_config()`. Unknown keys are rejected so
that a typo fails the deploy instead of silently falling back to a default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from serve_app.auth.settings import MIN_KEY_LENGTH, AuthConfig
from serve_app.cache.policy import PolicyName
from serve_app.gateway.hot_copies import HotCopiesConfig
from serve_app.gateway.routing_config import RoutingConfig
from serve_app.host.working_set import WorkingSetConfig

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
DEFAULT_POOL = "default"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: Any) -> int:
    """Parse `1048576`, `"512MiB"`, `"2GB"` into a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '512MiB'")
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(f"cannot read {value!r} as a size: use bytes or a string like '512MiB'")


ByteSize = Annotated[int, BeforeValidator(parse_bytes), Field(ge=0)]


def _serve_env() -> Any:
    return Field(
        None,
        description="Environment variables of this deployment's replicas (Ray Serve's "
        "per-process settings). Default: Serve's throughput settings (request handling and "
        "fleetserve's code on one event loop, GC frozen after start); {} keeps Serve's "
        "defaults.",
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(_Strict):
    """Where model artifacts and manifests live (S3 or any S3-compatible store)."""

    url: str = Field("s3://fleet/models", description="Bucket and prefix, like s3://fleet/models.")
    endpoint_url: str | None = Field(
        None, description="S3 endpoint; default: AWS_ENDPOINT_URL, then AWS itself."
    )
    region: str | None = Field(None, description="Region; default: AWS_REGION or us-east-1.")
    access_key_id: SecretStr | None = Field(None, description="Default: AWS_ACCESS_KEY_ID.")
    secret_access_key: SecretStr | None = Field(None, description="Default: AWS_SECRET_ACCESS_KEY.")
    max_concurrency: int = Field(
        4, ge=1, le=64, description="Ranged GETs in flight per replica (all loads share them)."
    )
    chunk_bytes: ByteSize = Field(
        8 * 2**20, ge=1, description="Size of one ranged GET (8-16 MiB is typical)."
    )
    connect_timeout_s: float = Field(3.0, gt=0, description="Connect timeout per S3 call.")
    read_timeout_s: float = Field(
        60.0, gt=0, description="Longest silence of a socket during an S3 call."
    )
    download_timeout_s: float = Field(
        600.0, gt=0, description="Most seconds one version's download may take (then 503)."
    )
    stall_timeout_s: float = Field(
        20.0,
        gt=0,
        description="A download from which the store sent no byte for this long fails with "
        "503 (a stalled store: it accepts connections and never answers).",
    )
    max_list_pages: int = Field(
        10_000,
        ge=1,
        description="Most ListObjectsV2 pages (1,000 keys each) one listing of the store "
        "may take; past it (or on a repeated continuation token) the listing fails (503).",
    )
    max_manifest_bytes: ByteSize = Field(
        1 * 2**20,
        ge=1,
        description="Largest manifest.json read from the store; a bigger one is skipped "
        "(registry) or refused (502).",
    )
    max_aux_file_bytes: ByteSize = Field(
        64 * 2**20,
        description="Largest non-weight file (config, tokenizer) a manifest may declare.",
    )
    retries: int = Field(2, ge=0, le=10, description="Retries per S3 call on transient errors.")

    @property
    def bucket(self) -> str:
        """The bucket part of `url`."""
        return self.url.removeprefix("s3://").split("/", 1)[0]

    @property
    def root(self) -> str:
        """`bucket/prefix` without scheme or trailing slash (the s3fs path of the store)."""
        return self.url.removeprefix("s3://").rstrip("/")

    def resolved_endpoint(self) -> str | None:
        """The endpoint from config, else from the AWS_ENDPOINT_URL variables."""
        return (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )


class BatchPolicyConfig(_Strict):
    """Dynamic batching of one model: concurrent requests run as one forward pass."""

    max_batch_size: int = Field(
        32, ge=1, le=65536, description="Most input rows in one batch; 1 turns batching off."
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="How long a batch may wait to fill; 0: never wait, batch what queued up.",
    )


class BatchingConfig(BatchPolicyConfig):
    """Batching defaults for every model, with per-model overrides (by model id)."""

    group_by_replica: bool = Field(
        True,
        description="One ingress -> host call carries the waiting requests of every warm "
        "model that replica holds (each model still runs its own batches); off: one call "
        "per model.",
    )
    models: dict[str, BatchPolicyConfig] = Field(
        default_factory=dict, description="Per-model-id overrides of the defaults."
    )

    def for_model(self, model_id: str) -> BatchPolicyConfig:
        """The policy of `model_id`: its override, else the defaults."""
        return self.models.get(model_id) or BatchPolicyConfig(
            max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms
        )


class HostConfig(_Strict):
    """The model-host pool: replicas that hold models in a byte-budgeted cache."""

    num_replicas: int = Field(2, ge=1, description="Replicas in the pool.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs each replica reserves.")
    accelerator: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: a GPU per replica when the cluster has GPUs, else CPU."
    )
    memory_budget: ByteSize | None = Field(
        None, description="Bytes of models a replica may hold; default 2GiB on CPU.", gt=0
    )
    gpu_memory_fraction: float = Field(
        0.8, gt=0, le=1, description="On GPU without memory_budget: this share of device memory."
    )
    eviction_policy: PolicyName = Field(
        "lru",
        description="Which idle model a full replica evicts first: lru (least recently used) "
        "or gdsf (GreedyDual-Size-Frequency: keeps the most reload-seconds per byte).",
    )
    max_concurrent_loads: int = Field(2, ge=1, description="Loads that run at once per replica.")
    failure_ttl_s: float = Field(10.0, ge=0, description="How long a failed load is remembered.")
    load_timeout_s: float = Field(300.0, gt=0, description="Max wait for a load or for room.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per replica.")
    max_ongoing_requests: int = Field(16, ge=1, description="Concurrent requests per replica.")
    serve_env: dict[str, str] | None = _serve_env()
    predict_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="Prediction threads per replica (loads have their own).",
    )
    router: Literal["affinity", "ray"] = Field(
        "affinity",
        description="affinity: fleetserve's router (cold models placed at once by free "
        "budget); ray: Ray Serve's stock multiplexed power-of-two router.",
    )
    batching: BatchingConfig = Field(
        default_factory=BatchingConfig, description="Per-model dynamic batching."
    )
    disk_cache_dir: str | None = Field(
        None, description="Local disk tier for downloaded artifacts; default: a temp folder."
    )
    disk_cache_bytes: ByteSize = Field(
        8 * 2**30, description="Bytes the local disk tier may hold before pruning."
    )
    ram_cache_bytes: ByteSize = Field(
        0,
        description="Host-RAM tier for GPU replicas: verified weights of recently loaded "
        "versions kept in host memory (LRU), so reloading a model evicted from the device is "
        "a host-to-device copy, not a fetch. 0 (default): off.",
    )
    max_model_labels: int = Field(
        200, ge=1, description="Distinct model label values in metrics; the rest: __other__."
    )
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description="At most this many replicas of the pool on one Ray node (Serve's "
        "max_replicas_per_node): the pool is spread for sure, and a lost node takes at most "
        "this many. None: Serve's best-effort spread.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each replica needs, to place the pool on a node "
        "group (e.g. {fleet_gpu: 1} where only GPU workers declare fleet_gpu).",
    )
    hot_copies: HotCopiesConfig = Field(
        default_factory=HotCopiesConfig, description="Extra copies of hot models (off: 1)."
    )


class ManagementConfig(_Strict):
    """The management endpoints (load/unload/pin, residency, /v1/replicas, V2 repository)."""

    enabled: bool = Field(
        True,
        description="False turns every management endpoint off (403), and hosts stop "
        "applying the management API's stored pins.",
    )
    admin_key: SecretStr | None = Field(
        None,
        description="The admin key (default: FLEET_ADMIN_KEY of the ingress); management "
        "calls need `Authorization: Bearer <key>`. At least 16 characters.",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="Without an admin key, management answers 403 unless this is true "
        "(then anyone who reaches the port may load, pin and unload).",
    )

    command_timeout_s: float = Field(
        120.0, gt=0, description="How long a load/pin/unload waits for one replica."
    )

    @model_validator(mode="after")
    def _key_long_enough(self) -> ManagementConfig:
        key = self.admin_key
        if key is not None and len(key.get_secret_value()) < MIN_KEY_LENGTH:
            raise ValueError(
                f"admin_key is shorter than {MIN_KEY_LENGTH} characters: use a random key, "
                "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return self

    def resolved_admin_key(self) -> str | None:
        """The admin key from config, else from FLEET_ADMIN_KEY; None means none is set.

        Raises:
            ValueError: FLEET_ADMIN_KEY is shorter than 16 characters.
        """
        if self.admin_key is not None:
            return self.admin_key.get_secret_value()
        key = os.environ.get("FLEET_ADMIN_KEY") or None
        if key is not None and len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"FLEET_ADMIN_KEY is shorter than {MIN_KEY_LENGTH} characters")
        return key


class IngressConfig(_Strict):
    """The HTTP/handle front door: validation, registry, routing to the host pool."""

    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(0.25, gt=0, description="CPUs each ingress replica reserves.")
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        description="Concurrent requests per ingress replica (it only awaits the hosts; "
        "Serve's default of 5 would queue a 16-client load in the proxy).",
    )
    serve_env: dict[str, str] | None = _serve_env()
    registry_refresh_s: float = Field(
        2.0, gt=0, description="Seconds between background refreshes of the model registry."
    )
    max_body_bytes: ByteSize = Field(8 * 2**20, description="Largest request body accepted.")
    max_batch_rows: int = Field(4096, ge=1, description="Most inputs in one predict call.")
    max_model_labels: int = Field(
        200, ge=1, description="Distinct model label values in metrics; the rest: __other__."
    )
    stats_window_s: float = Field(
        300.0, gt=0, description="Default window of GET /v1/stats (override with ?window_s=)."
    )
    management: ManagementConfig = Field(
        ManagementConfig(), description="Management endpoints: on/off and admin key."
    )
    autoscaling: dict[str, Any] | None = Field(
        None,
        description="Serve autoscaling_config of the ingress (min_replicas, max_replicas, "
        "target_ongoing_requests, ...): it scales out on ongoing requests; replaces "
        "num_replicas.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each ingress replica needs, to keep it on CPU "
        "nodes (e.g. {fleet_ingress: 1} where only CPU workers declare fleet_ingress).",
    )

    @property
    def may_scale_out(self) -> bool:
        """Whether more than one ingress replica can run (they then share stats)."""
        scaling = self.autoscaling or {}
        return self.num_replicas > 1 or int(scaling.get("max_replicas", 1)) > 1


class PoolConfig(HostConfig):
    """One model-host pool: its own Serve deployment, replicas, budget, accelerator."""

    name: str = Field(
        DEFAULT_POOL, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$", description="Pool name."
    )
    autoscaling: dict[str, Any] | None = Field(
        None,
        description="Serve autoscaling_config (min_replicas, max_replicas, "
        "target_ongoing_requests, ...); when set, it replaces num_replicas.",
    )
    autoscale_on_working_set: WorkingSetConfig | None = Field(
        None, description="With autoscaling: scale on the bytes of models requested too."
    )

    @property
    def deployment_name(self) -> str:
        """The Serve deployment of this pool (`ModelHost` for the default pool)."""
        return "ModelHost" if self.name == DEFAULT_POOL else f"ModelHost-{self.name}"


class AppConfig(_Strict):
    """Arguments of the `fleet` application (the `args:` block in config.yaml).

    `host` describes the single default pool; `pools` (if given) declares several pools
    instead. `routing` is the initial routing policy (see RoutingConfig)."""

    store: StoreConfig = StoreConfig()
    host: HostConfig = HostConfig()
    pools: list[PoolConfig] | None = Field(None, min_length=1)
    ingress: IngressConfig = IngressConfig()
    routing: RoutingConfig = RoutingConfig()
    auth: AuthConfig = AuthConfig()

    @model_validator(mode="after")
    def _pools_fit(self) -> AppConfig:
        if self.pools is not None and "host" in self.model_fields_set:
            raise ValueError("give either host (one pool) or pools (several), not both")
        problems: list[str] = []
        names = [p.name for p in self.pool_configs()]
        if len(set(names)) != len(names):
            problems.append(f"pool names must be unique; got {', '.join(names)}")
        for pool in self.pools or []:
            if not pool.memory_budget and pool.accelerator != "cuda":
                problems.append(
                    f"pool {pool.name!r} has no memory budget: set memory_budget (bytes per "
                    "replica, e.g. 512MiB), or accelerator: cuda to use gpu_memory_fraction"
                )
        problems.extend(self.routing.problems_with_pools(names))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def pool_configs(self) -> list[PoolConfig]:
        """The declared pools; without `pools`, one `default` pool from `host`."""
        if self.pools is not None:
            return list(self.pools)
        return [PoolConfig(name=DEFAULT_POOL, **self.host.model_dump())]


def describe_errors(exc: ValidationError) -> str:
    """A pydantic validation error as one line per problem: `where: what to fix`."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err.get("loc", ())) or "config"
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def load_config(path: str | Path, app_name: str = "fleet") -> AppConfig:
    """Read the `args:` of application `app_name` from a Serve config file and validate them."""
    data = yaml.safe_load(Path(path).read_text())
    for app in data.get("applications", []):
        if app.get("name") == app_name:
            return AppConfig.model_validate(app.get("args") or {})
    raise ValueError(f"{path} has no application named {app_name!r}")
