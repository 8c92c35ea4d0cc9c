"""Open Inference Protocol v2: the tensors each task takes and gives, and the mapping
between them and the native inputs and outputs of the three tasks.

- `signature()` / `model_metadata()`: a model version's input and output tensor metadata,
  derived from its manifest's task (what `GET /v2/models/{m}` answers);
- `to_model_inputs()`: decoded request tensors to native inputs (rows of numbers, texts);
- `to_output_tensors()`: native outputs to the V2 output tensors the codec encodes.

The wire format itself (JSON and binary tensors) is `serve_app.api.v2_codec`. Well-formed
tensors that do not fit the model (wrong name, datatype or shape) are `InvalidInput` (422),
as on the native API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from serve_app.api.v2_codec import InferRequest, Tensor, object_array
from serve_app.errors import InvalidInput
from serve_app.loading.architectures import input_width
from serve_app.storage.manifest import Manifest

FLOAT_TYPES = frozenset({"FP16", "BF16", "FP32", "FP64"})


@dataclass(frozen=True)
class TensorSpec:
    """Metadata of one input or output tensor (-1 marks a variable dimension)."""

    name: str
    datatype: str
    shape: list[int]

    def as_dict(self) -> dict[str, Any]:
        """The `$metadata_tensor` JSON object."""
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


@dataclass(frozen=True)
class Signature:
    """Inputs and outputs of a model, derived from its task."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def signature(manifest: Manifest) -> Signature:
    """The V2 tensor metadata of a model version, derived from its task."""
    if manifest.task == "tabular-classification":
        width = input_width(manifest.architecture) or -1
        return Signature(
            inputs=[TensorSpec("input", "FP32", [-1, width])],
            outputs=[TensorSpec("score", "FP32", [-1])],
        )
    text = [TensorSpec("text", "BYTES", [-1])]
    if manifest.task == "text-classification":
        labels = len(manifest.labels) if manifest.labels else -1
        return Signature(
            inputs=text,
            outputs=[
                TensorSpec("label", "BYTES", [-1]),
                TensorSpec("score", "FP32", [-1]),
                TensorSpec("scores", "FP32", [-1, labels]),
            ],
        )
    return Signature(inputs=text, outputs=[TensorSpec("embedding", "FP32", [-1, -1])])


def model_metadata(manifest: Manifest, versions: list[str]) -> dict[str, Any]:
    """The model metadata response (`GET /v2/models/{m}[/versions/{v}]`)."""
    sig = signature(manifest)
    return {
        "name": manifest.model_id,
        "versions": versions,
        "platform": manifest.format,
        "inputs": [s.as_dict() for s in sig.inputs],
        "outputs": [s.as_dict() for s in sig.outputs],
        "parameters": {"task": manifest.task},
    }


def to_model_inputs(manifest: Manifest, request: InferRequest) -> list[Any]:
    """The native inputs (rows of numbers or texts) for a request's tensors.

    Raises:
        InvalidInput: wrong input name, datatype or shape for this model (422).
    """
    sig = signature(manifest)
    (spec,) = sig.inputs
    known = [o.name for o in sig.outputs]
    for wanted in request.outputs or []:
        if wanted.name not in known:
            raise InvalidInput(
                f"{manifest.model_id} has no output {wanted.name!r}; outputs: {', '.join(known)}"
            )
    if len(request.inputs) != 1 or request.inputs[0].name != spec.name:
        names = ", ".join(repr(t.name) for t in request.inputs)
        raise InvalidInput(f"{manifest.model_id} takes one input {spec.name!r}; got {names}")
    tensor = request.inputs[0]
    if spec.datatype == "BYTES":
        if tensor.datatype != "BYTES":
            raise InvalidInput(
                f"input {spec.name!r} of {manifest.model_id} is BYTES (UTF-8 text), "
                f"got {tensor.datatype}"
            )
        if tensor.data.ndim not in (1, 2) or (tensor.data.ndim == 2 and tensor.shape[1] != 1):
            raise InvalidInput(
                f"input {spec.name!r} of {manifest.model_id} has shape [-1] (or [-1, 1]), "
                f"got {tensor.shape}"
            )
        try:
            return [bytes(v).decode("utf-8") for v in tensor.data.ravel()]
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"input {spec.name!r}: an element is not UTF-8 text") from exc
    if tensor.datatype not in FLOAT_TYPES:
        raise InvalidInput(
            f"input {spec.name!r} of {manifest.model_id} is FP32 (FP16, BF16, FP64 also "
            f"accepted), got {tensor.datatype}"
        )
    width = spec.shape[1]
    if tensor.data.ndim != 2 or (width != -1 and tensor.shape[1] != width):
        raise InvalidInput(
            f"input {spec.name!r} of {manifest.model_id} has shape [-1, {width}], "
            f"got {tensor.shape}"
        )
    values = tensor.data.astype(np.float64)
    if not np.isfinite(values).all():
        raise InvalidInput(f"input {spec.name!r}: values must be finite numbers")
    return values.tolist()


def to_output_tensors(manifest: Manifest, outputs: list[Any]) -> list[Tensor]:
    """The V2 output tensors for a model's native outputs."""
    if manifest.task == "tabular-classification":
        return [Tensor("score", "FP32", np.asarray(outputs, dtype=np.float32))]
    if manifest.task == "text-classification":
        labels = manifest.labels or list(outputs[0]["scores"]) if outputs else []
        scores = np.asarray(
            [[o["scores"].get(label, 0.0) for label in labels] for o in outputs], dtype=np.float32
        ).reshape(len(outputs), len(labels))
        return [
            Tensor("label", "BYTES", object_array([o["label"].encode() for o in outputs])),
            Tensor("score", "FP32", np.asarray([o["score"] for o in outputs], dtype=np.float32)),
            Tensor("scores", "FP32", scores),
        ]
    return [Tensor("embedding", "FP32", np.asarray(outputs, dtype=np.float32))]
