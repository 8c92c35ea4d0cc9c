"""Request and response bodies of the native API, and the messages between ingress and hosts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.storage.manifest import Manifest


class PredictRequest(BaseModel):
    """Body of `POST /v1/models/{model_id}/predict` and `POST /v1/predict`."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(
        description="Rows of numbers (tabular models), strings (text models) or "
        "base64-encoded JPEG, PNG or WebP files (image models)."
    )
    version: str | None = Field(None, description="Pinned version; default: the latest.")


class PredictResponse(BaseModel):
    """A prediction, naming the exact model version that produced it."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    version: str
    task: str
    outputs: list[Any]
    resident: bool = Field(description="True if the model was already loaded (a cache hit).")
    load_wait_ms: float = Field(description="Time this request waited for a load.")
    replica: str = Field(description="The model-host replica that served it.")
    alias: str | None = Field(None, description="The alias requested, if it was one.")
    arm: str | None = Field(None, description="The alias arm that served (its target).")


class ErrorBody(BaseModel):
    """Every error response: a message and a stable snake_case code."""

    error: str
    code: str


class ModelSummary(BaseModel):
    """One model in `GET /v1/models`."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    latest_version: str
    versions: list[str]
    task: str
    format: str
    size_bytes: int


class ModelList(BaseModel):
    """`GET /v1/models`."""

    models: list[ModelSummary]
    count: int
    registry_age_s: float | None


class ModelDetail(BaseModel):
    """`GET /v1/models/{model_id}`: the manifest of the latest (or requested) version."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    versions: list[str]
    manifest: Manifest
    residency: list[Residency] | None = Field(
        None,
        description="Replicas holding any version of it (null when management is off).",
    )


class PredictCall(BaseModel):
    """What the ingress sends a model host: the resolved manifest and validated inputs."""

    model_config = ConfigDict(frozen=True)

    manifest: Manifest
    inputs: list[Any]
    request_id: str
    pool: str = Field("default", description="The model-host pool the call goes to.")


class Residency(BaseModel):
    """Where one version of a model is resident: a replica and what it holds of it."""

    replica: str
    pool: str
    device: str
    node: str | None = Field(None, description="Readable name of the replica's Ray node.")
    version: str
    bytes: int = Field(description="Measured bytes on the device.")
    loaded_at: float | None = Field(None, description="Unix time the load finished.")
    last_used: float | None = Field(None, description="Unix time of the last request.")
    load_s: float | None = None
    pinned: bool = False
    leases: int = Field(0, description="Requests using it right now.")


class HostCommand(BaseModel):
    """A management command for one model-host replica (the router delivers it there)."""

    model_config = ConfigDict(frozen=True)

    op: Literal["load", "unload", "pin", "unpin"]
    replica: str = Field(description="The replica that must execute it.")
    key: str = Field(description="`model_id@version`.")
    manifest: Manifest | None = Field(None, description="Needed for load and pin.")


class HostReply(BaseModel):
    """What a replica did with a `HostCommand`, and the model's state there afterwards."""

    replica: str
    key: str
    changed: bool = Field(description="Whether the command changed anything.")
    resident: bool
    pinned: bool
    pinned_before: bool = Field(False, description="Whether it was pinned before the command.")
    bytes: int = 0
    in_flight: int = Field(0, description="Requests holding the model when the command ran.")


class ReplicaOutcome(BaseModel):
    """One replica's part of a management action."""

    replica: str
    ok: bool
    changed: bool = False
    resident: bool = False
    pinned: bool = False
    bytes: int = 0
    in_flight: int = Field(
        0, description="Requests holding the model then (an unload waits for them)."
    )
    error: str | None = None
    code: str | None = None


class ManagementResult(BaseModel):
    """Answer of `POST .../load|unload` and `PUT|DELETE .../pin`."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    versions: list[str]
    action: str
    replicas: list[ReplicaOutcome]


@dataclass(frozen=True)
class PredictBatch:
    """What the ingress sends a model host: several requests for one model version.

    A dataclass, not a pydantic model: it crosses a Ray actor boundary on every request, and
    the manifest is pickled once per batch instead of once per request."""

    manifest: Manifest
    inputs: list[list[Any]]  # validated rows, one list per request
    request_ids: list[str]
    # NOTE: set by the router while it makes an extra copy of a hot model: the replica (unique
    # id) whose copy it is; that replica marks its copy when it serves this batch.
    copy_on: str | None = None


@dataclass(frozen=True)
class ReplicaBatch:
    """What the ingress sends one model host when it groups by replica: the waiting requests
    of several models that `replica` (unique id) holds, one `PredictBatch` per model. One
    Serve call carries them all; each model still runs its own forward passes. The host
    answers with one `BatchResult` (or the typed error of that model) per batch, in order.
    """

    batches: list[PredictBatch]
    replica: str

    @property
    def model_key(self) -> str:
        """The key the call is routed by (its first model's)."""
        return self.batches[0].manifest.key


@dataclass(frozen=True)
class BatchResult:
    """A host's answer to a `PredictBatch`: per request its outputs or its typed error."""

    outputs: list[list[Any] | BaseException]
    resident: bool
    load_wait_ms: float
    replica: str

    def outcome(self, manifest: Manifest, index: int) -> PredictResponse | BaseException:
        """Request `index`'s `PredictResponse`, or its error."""
        outputs = self.outputs[index]
        if isinstance(outputs, BaseException):
            return outputs
        return PredictResponse(
            model_id=manifest.model_id,
            version=manifest.version,
            task=manifest.task,
            outputs=outputs,
            resident=self.resident,
            load_wait_ms=self.load_wait_ms,
            replica=self.replica,
        )

    def response(self, manifest: Manifest, index: int) -> PredictResponse:
        """Request `index`'s `PredictResponse`; raises that request's error."""
        outcome = self.outcome(manifest, index)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
