"""The Open Inference Protocol v2 request bodies, as the OpenAPI document describes them.

The codec (`serve_app.api.v2_codec`) reads the wire format itself (JSON, or JSON plus
binary tensor data); these pydantic models exist so that `/openapi.json` states the same
constraints the codec checks: datatypes, at most 8 non-negative dimensions, typed
`binary_data*` parameters, a non-empty `inputs` list. `request_body()` builds the
`requestBody` object of the infer routes (JSON, or binary with
`Inference-Header-Content-Length`), with an example for a demo model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.v2_codec import MAX_DIMS

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
]


class TensorParameters(BaseModel):
    """Parameters of one input tensor (others are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    binary_data_size: int | None = Field(
        None, ge=0, description="Bytes of this tensor in the binary part of the body."
    )


class InputTensor(BaseModel):
    """One input tensor: JSON `data` (flat or nested, row-major) or binary data."""

    name: str = Field(min_length=1)
    datatype: Datatype = Field(description="FP16 and BF16 only as binary data.")
    shape: list[Annotated[int, Field(ge=0)]] = Field(
        max_length=MAX_DIMS,
        description="Dimensions; their product (0 counted as 1) is at most the model's "
        "element limit: ingress.max_batch_rows rows of the model's input width.",
    )
    data: Any = Field(None, description="Elements (numbers, true/false, or strings for BYTES).")
    parameters: TensorParameters | None = None


class OutputParameters(BaseModel):
    """Parameters of a requested output."""

    model_config = ConfigDict(extra="allow")

    binary_data: bool | None = Field(None, description="Send this output as binary data.")


class RequestedOutput(BaseModel):
    """An output to return (all outputs when `outputs` is absent)."""

    name: str = Field(min_length=1)
    parameters: OutputParameters | None = None


class RequestParameters(BaseModel):
    """Request-level parameters (others are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    binary_data_output: bool | None = Field(
        None, description="All outputs as binary data (tritonclient's default)."
    )


class InferRequestBody(BaseModel):
    """`POST /v2/models/{m}[/versions/{v}]/infer` (the JSON part of a binary request)."""

    id: str | None = Field(None, description="Echoed in the response.")
    parameters: RequestParameters | None = None
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class RepositoryParameters(BaseModel):
    """Parameters of a repository load (`config` overrides are refused)."""

    model_config = ConfigDict(extra="allow")


class RepositoryRequest(BaseModel):
    """Optional body of the repository routes (an empty body is `{}`)."""

    model_config = ConfigDict(extra="allow")

    parameters: RepositoryParameters | None = None
    ready: bool | None = Field(None, description="Index only: list READY versions only.")


INFER_EXAMPLE = {
    "id": "1",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": [[0.1] * 32]}],
}


def request_body(model: type[BaseModel], example: dict[str, Any] | None = None) -> dict[str, Any]:
    """An `openapi_extra` with `model` as the JSON request body (and, for inference, the
    binary tensor data extension as `application/octet-stream`)."""
    json_content: dict[str, Any] = {"schema": inline(model.model_json_schema())}
    if example is not None:
        json_content["example"] = example
    content: dict[str, Any] = {"application/json": json_content}
    if model is InferRequestBody:
        content["application/octet-stream"] = {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": "The JSON header (Inference-Header-Content-Length bytes), "
                "then each input's binary data in order.",
            }
        }
    return {"requestBody": {"required": model is InferRequestBody, "content": content}}


def inline(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its `$defs` references replaced by the definitions themselves (an
    inline request body cannot point into its own `$defs`)."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    out: dict[str, Any] = resolve(schema)
    return out
