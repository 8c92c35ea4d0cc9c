"""The Open Inference Protocol v2 (KServe / Triton HTTP) wire codec: tensors in, tensors out.

Pure functions and small dataclasses, no HTTP framework and no Ray:

- `parse_infer_request()`: the JSON header plus the binary tensor data extension
  (`Inference-Header-Content-Length`, per-input `binary_data_size`), JSON tensors flat or
  nested, BYTES elements length-prefixed (4-byte little-endian), FP16 and BF16 as binary;
- `encode_infer_response()`: JSON outputs or binary outputs (`binary_data_output`, per-output
  `binary_data`), with the header length that tells the client where the binary part starts.

What the tensors mean to a model (its signature, the mapping to native inputs and outputs)
is `serve_app.api.v2_tasks`; gzip/deflate bodies are undone before this codec sees them
(`serve_app.api.body`). Protocol-level mistakes (unreadable JSON, sizes that do not add
up, unknown datatypes, mistyped parameters, shapes over the element limit) are
`BadRequest` (400); a requested output the model does not produce is `InvalidInput` (422).

Hostile input costs little: the element limit (`max_elements`, per tensor; the routes pass
the resolved model's own limit) is checked against the declared shape before any data is
decoded, and BYTES and JSON data are walked only as far as the shape allows.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.api.v2_header import (
    DATATYPES,
    HEADER_LENGTH,
    MAX_DIMS,
    MAX_ELEMENTS,
    header_digits,
    parameters_of,
    read_header,
    tensor_spec,
)
from serve_app.errors import BadRequest, InvalidInput

_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class Tensor:
    """One named tensor. BYTES data is an object array of `bytes`; BF16 is held as float32."""

    name: str
    datatype: str
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> list[int]:
        """The tensor's shape."""
        return [int(d) for d in self.data.shape]


@dataclass(frozen=True)
class RequestedOutput:
    """An entry of the request's `outputs`: a name and whether it should be binary."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request."""

    inputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None

    @property
    def binary_output(self) -> bool:
        """The request-level `binary_data_output` parameter (tritonclient's default)."""
        return bool(self.parameters.get("binary_data_output", False))


# ---------------------------------------------------------------------- requests
def parse_infer_request(
    body: bytes,
    header_length: str | int | None,
    max_elements: int = MAX_ELEMENTS,
    max_items: int | None = None,
) -> InferRequest:
    """Decode an inference request: a JSON header, then the binary tensor data, if any.

    Args:
        body: the (decompressed) request body.
        header_length: the `Inference-Header-Content-Length` header, or None when the whole
            body is JSON.
        max_elements: the most elements one input tensor may have (checked on its shape
            before its data is decoded).
        max_items: the most elements of a BYTES tensor (default: `max_elements`).

    Raises:
        BadRequest: malformed JSON, sizes, parameters or tensors, or a tensor over
            `max_elements` (400).
    """
    split = _header_length(header_length, len(body))
    raw_header = body if split is None else body[:split]
    header, specs = read_header(raw_header, max_elements)
    binary = memoryview(body)[split:] if split is not None else memoryview(b"")
    offset = 0
    inputs = []
    for spec in specs:
        tensor, used = decode_tensor(spec, binary[offset:], max_elements, max_items)
        offset += used
        inputs.append(tensor)
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data after the last input's binary_data_size"
        )
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise BadRequest(f"input names repeat: {names}")
    return InferRequest(
        inputs=inputs,
        id=_optional_str(header.get("id"), "id"),
        parameters=parameters_of(header.get("parameters"), "request"),
        outputs=_requested_outputs(header.get("outputs")),
    )


def _header_length(value: str | int | None, body_length: int) -> int | None:
    length = header_digits(value)
    if length is None:
        return None
    if length <= 0:
        # NOTE: 0 is Triton's "raw binary request" (one input, no JSON); tritonclient never
        # sends it.
        raise BadRequest(f"{HEADER_LENGTH} must be positive (raw binary requests are not served)")
    if length > body_length:
        raise BadRequest(f"{HEADER_LENGTH} {length} is longer than the body ({body_length} bytes)")
    return length


def decode_tensor(
    spec: Any, binary: memoryview, max_elements: int = MAX_ELEMENTS, max_items: int | None = None
) -> tuple[Tensor, int]:
    """Decode one input tensor; return it and the binary bytes it consumed.

    Raises:
        BadRequest: a malformed tensor, or a shape over `max_elements` (400), before any
            of its data is decoded.
    """
    name, datatype, shape, parameters = tensor_spec(spec, max_elements, max_items)
    count = math.prod(shape)
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in spec:
            raise BadRequest(f"input {name!r} has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
        if size > len(binary):
            raise BadRequest(
                f"input {name!r}: binary_data_size {size} but only {len(binary)} bytes remain"
            )
        data = _from_binary(name, datatype, binary[:size], count)
        used = size
    else:
        if "data" not in spec:
            raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
        if datatype in ("BF16", "FP16"):
            raise BadRequest(f"input {name!r}: send {datatype} tensors as binary data")
        data = _from_json(name, datatype, spec["data"], count)
        used = 0
    return Tensor(name, datatype, data.reshape(shape), parameters), used


def _from_binary(name: str, datatype: str, raw: memoryview, count: int) -> np.ndarray:
    if datatype == "BYTES":
        return _unpack_bytes(name, raw, count)
    itemsize = 2 if datatype == "BF16" else DATATYPES[datatype].itemsize
    if len(raw) != count * itemsize:
        raise BadRequest(
            f"input {name!r}: {len(raw)} bytes of {datatype} data, shape needs {count * itemsize}"
        )
    if datatype == "BF16":
        return _bf16_to_float32(raw)
    return np.frombuffer(raw, dtype=DATATYPES[datatype]).copy()


def _from_json(name: str, datatype: str, data: Any, count: int) -> np.ndarray:
    flat = _flatten(name, data, count)
    if len(flat) != count:
        raise BadRequest(f"input {name!r}: {len(flat)} elements of data for {count} in shape")
    if datatype == "BYTES":
        if not all(isinstance(v, str | bytes) for v in flat):
            raise BadRequest(f"input {name!r}: BYTES data must be strings")
        return object_array([v.encode() if isinstance(v, str) else v for v in flat])
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise BadRequest(f"input {name!r}: BOOL data must be true/false")
    elif not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
        raise BadRequest(f"input {name!r}: {datatype} data must be numbers")
    try:
        return np.array(flat, dtype=DATATYPES[datatype])
    except OverflowError as exc:
        raise BadRequest(f"input {name!r}: a value does not fit {datatype}") from exc


def _flatten(name: str, data: Any, count: int) -> list[Any]:
    """`data` (nested lists, at most `MAX_DIMS` deep) flattened; stops past `count` items."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= MAX_DIMS:
                    raise BadRequest(f"input {name!r}: data nested deeper than {MAX_DIMS}")
                stack.append(iter(item))
                break
            out.append(item)
            if len(out) > count:
                raise BadRequest(f"input {name!r}: more elements of data than {count} in shape")
        else:
            stack.pop()
    return out


def _unpack_bytes(name: str, raw: memoryview, count: int) -> np.ndarray:
    """`count` length-prefixed BYTES elements, which must fill `raw` exactly.

    NOTE: each element's offset depends on every length before it, so the walk is
    sequential; it is bounded by `count`, which the shape check has already held to the
    model's element limit, and nothing past `count` elements is ever read.
    """
    items = np.empty(count, dtype=object)
    end = len(raw)
    offset = 0
    unpack = _U32.unpack_from
    for i in range(count):
        if offset + 4 > end:
            if offset == end:
                raise BadRequest(f"input {name!r}: {i} BYTES elements for {count} in shape")
            raise BadRequest(f"input {name!r}: truncated BYTES length prefix")
        (length,) = unpack(raw, offset)
        offset += 4
        if length > end - offset:
            raise BadRequest(f"input {name!r}: a BYTES element runs past the end of its data")
        items[i] = bytes(raw[offset : offset + length])
        offset += length
    if offset != end:
        raise BadRequest(
            f"input {name!r}: {end - offset} bytes of BYTES data after the {count} elements "
            "in shape"
        )
    return items


def _pack_bytes(items: np.ndarray) -> bytes:
    parts = []
    for item in items.ravel():
        value = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(len(value).to_bytes(4, "little"))
        parts.append(value)
    return b"".join(parts)


def object_array(items: list[Any]) -> np.ndarray:
    """A 1-D object array of `items` (numpy would otherwise nest sequences)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _bf16_to_float32(raw: bytes | memoryview) -> np.ndarray:
    halves = np.frombuffer(raw, dtype="<u2").astype("<u4")
    return (halves << 16).view("<f4")


def _float32_to_bf16(values: np.ndarray) -> bytes:
    # NOTE: truncation, as tritonclient's and Triton's own BF16 conversions do.
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    return (bits >> 16).astype("<u2").tobytes()


def _optional_str(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string")
    return value


def _requested_outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadRequest("'outputs' must be a list of {name, parameters}")
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest("each requested output needs a 'name'")
        parameters = parameters_of(item.get("parameters"), f"output {item['name']!r}")
        binary = parameters.get("binary_data")
        out.append(RequestedOutput(item["name"], None if binary is None else bool(binary)))
    return out


# ---------------------------------------------------------------------- responses
def encode_tensor(tensor: Tensor, binary: bool) -> tuple[dict[str, Any], bytes]:
    """The JSON description of an output tensor and its binary data (empty for JSON)."""
    described: dict[str, Any] = {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": tensor.shape,
    }
    if binary:
        if tensor.datatype == "BYTES":
            raw = _pack_bytes(tensor.data)
        elif tensor.datatype == "BF16":
            raw = _float32_to_bf16(tensor.data)
        else:
            raw = np.ascontiguousarray(tensor.data, dtype=DATATYPES[tensor.datatype]).tobytes()
        described["parameters"] = {"binary_data_size": len(raw)}
        return described, raw
    if tensor.datatype in ("FP16", "BF16"):
        raise BadRequest(f"output {tensor.name!r} is {tensor.datatype}: ask for it as binary data")
    if tensor.datatype == "BYTES":
        described["data"] = [_text(v) for v in tensor.data.ravel()]
    else:
        described["data"] = tensor.data.ravel().tolist()
    return described, b""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def encode_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: list[Tensor],
) -> tuple[bytes, int | None]:
    """Encode the response; returns the body and the JSON header length (None: all JSON).

    Outputs are filtered and made binary as the request asks: per output `binary_data`,
    else the request's `binary_data_output`.

    Raises:
        InvalidInput: a requested output the model does not produce (422).
    """
    by_name = {t.name: t for t in outputs}
    if request.outputs is None:
        chosen = [(t, request.binary_output) for t in outputs]
    else:
        chosen = []
        for wanted in request.outputs:
            if wanted.name not in by_name:
                raise InvalidInput(
                    f"{model_name} has no output {wanted.name!r}; outputs: {', '.join(by_name)}"
                )
            binary = request.binary_output if wanted.binary is None else wanted.binary
            chosen.append((by_name[wanted.name], binary))
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        header["id"] = request.id
    described, blobs = [], []
    for tensor, binary in chosen:
        entry, raw = encode_tensor(tensor, binary)
        described.append(entry)
        if binary:
            blobs.append(raw)
    header["outputs"] = described
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
