"""The V2 codec: binary and JSON tensors, BYTES, FP16/BF16, compression, metadata, errors.

Binary encodings are checked against tritonclient's own serializers.
"""

from __future__ import annotations

import gzip
import json
import zlib

import ml_dtypes
import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from serve_app.api.body import compress, decompress
from serve_app.api.v2_codec import (
    InferRequest,
    RequestedOutput,
    Tensor,
    encode_infer_response,
    parse_infer_request,
)
from serve_app.api.v2_tasks import model_metadata, to_model_inputs, to_output_tensors
from serve_app.errors import BadRequest, InvalidInput, PayloadTooLarge
from serve_app.storage.manifest import Manifest

FILES = [{"path": "model.safetensors", "size": 10, "sha256": "0" * 64}]


def manifest(task: str, **extra: object) -> Manifest:
    return Manifest.model_validate(
        {
            "model_id": "m",
            "version": "1",
            "format": "torch-module" if task.startswith("tabular") else "hf-transformers",
            "task": task,
            "files": FILES,
            "created_at": "2026-01-01T00:00:00+00:00",
            **extra,
        }
    )


TABULAR = manifest("tabular-classification", architecture={"kind": "mlp", "input_dim": 3})
CLASSIFIER = manifest("text-classification", labels=["neg", "pos"])
EMBEDDER = manifest("text-embedding")


def binary_request(tensors: list[tuple[str, str, list[int], bytes]], **header: object) -> tuple:
    specs = [
        {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(raw)}}
        for n, d, s, raw in tensors
    ]
    head = json.dumps({"inputs": specs, **header}).encode()
    return head + b"".join(raw for *_, raw in tensors), len(head)


def test_binary_fp32_matrix() -> None:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, length = binary_request([("input", "FP32", [2, 3], data.tobytes())])
    request = parse_infer_request(body, str(length))
    assert request.inputs[0].data.tolist() == data.tolist()
    assert to_model_inputs(TABULAR, request) == data.astype(np.float64).tolist()


def test_bytes_are_length_prefixed_like_tritonclient() -> None:
    texts = np.array([b"hello", "wörld".encode(), b""], dtype=object)
    raw = serialize_byte_tensor(texts).item()
    body, length = binary_request([("text", "BYTES", [3], raw)])
    request = parse_infer_request(body, length)
    assert to_model_inputs(EMBEDDER, request) == ["hello", "wörld", ""]
    out, _ = encode_infer_response(
        "m",
        "1",
        InferRequest(inputs=[], outputs=[RequestedOutput("label", True)]),
        [Tensor("label", "BYTES", texts)],
    )
    header_length = len(out) - len(raw)
    assert deserialize_bytes_tensor(out[header_length:]).tolist() == texts.tolist()


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_binary_in_and_out(datatype: str) -> None:
    values = np.array([[0.5, -1.25, 3.0]], dtype=np.float32)
    dtype = np.float16 if datatype == "FP16" else ml_dtypes.bfloat16
    body, length = binary_request([("input", datatype, [1, 3], values.astype(dtype).tobytes())])
    request = parse_infer_request(body, length)
    assert to_model_inputs(TABULAR, request) == values.astype(np.float64).tolist()
    out, header_length = encode_infer_response(
        "m",
        "1",
        InferRequest(inputs=[], parameters={"binary_data_output": True}),
        [Tensor("x", datatype, values)],
    )
    assert header_length is not None
    decoded = np.frombuffer(out[header_length:], dtype=dtype).astype(np.float32)
    assert decoded.tolist() == values.ravel().tolist()


def test_half_precision_is_refused_as_json() -> None:
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP16", "shape": [1, 1], "data": [1.0]}]}
    ).encode()
    with pytest.raises(BadRequest, match="binary"):
        parse_infer_request(body, None)


@pytest.mark.parametrize("data", [[[1, 2, 3], [4, 5, 6]], [1, 2, 3, 4, 5, 6]])
def test_json_tensors_flat_or_nested(data: list) -> None:
    body = json.dumps(
        {
            "id": "r1",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3], "data": data}],
        }
    ).encode()
    request = parse_infer_request(body, None)
    assert request.id == "r1"
    assert to_model_inputs(TABULAR, request) == [[1, 2, 3], [4, 5, 6]]


def test_json_response_echoes_id_and_filters_outputs() -> None:
    request = InferRequest(inputs=[], id="42", outputs=[RequestedOutput("score")])
    tensors = to_output_tensors(
        CLASSIFIER,
        [{"label": "pos", "score": 0.75, "scores": {"neg": 0.25, "pos": 0.75}}],
    )
    out, header_length = encode_infer_response("m", "1", request, tensors)
    assert header_length is None
    body = json.loads(out)
    assert body == {
        "model_name": "m",
        "model_version": "1",
        "id": "42",
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [1], "data": [0.75]}],
    }


def test_all_outputs_of_a_classifier() -> None:
    tensors = to_output_tensors(
        CLASSIFIER, [{"label": "neg", "score": 0.9, "scores": {"neg": 0.9, "pos": 0.1}}]
    )
    out, _ = encode_infer_response("m", "1", InferRequest(inputs=[]), tensors)
    outputs = {o["name"]: o for o in json.loads(out)["outputs"]}
    assert outputs["label"]["data"] == ["neg"]
    assert outputs["scores"]["shape"] == [1, 2]
    assert outputs["scores"]["data"] == pytest.approx([0.9, 0.1])


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_request_compression(encoding: str) -> None:
    raw = b'{"inputs": []}' * 100
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    assert decompress(packed, encoding, 10_000) == raw
    with pytest.raises(PayloadTooLarge):
        decompress(packed, encoding, 100)
    with pytest.raises(BadRequest):
        decompress(b"not compressed", encoding, 10_000)
    body, used = compress(raw, "gzip;q=1.0, identity")
    assert used == "gzip"
    assert gzip.decompress(body) == raw


def test_metadata_from_task() -> None:
    assert model_metadata(TABULAR, ["1"])["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3]}
    ]
    assert [o["name"] for o in model_metadata(CLASSIFIER, ["1"])["outputs"]] == [
        "label",
        "score",
        "scores",
    ]
    assert model_metadata(EMBEDDER, ["1", "2"])["outputs"] == [
        {"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}
    ]


@pytest.mark.parametrize(
    ("body", "length", "error"),
    [
        (b"{not json", None, BadRequest),
        (b'{"inputs": []}', None, BadRequest),
        (b'{"inputs": [{"name": "input", "datatype": "FP99", "shape": [1]}]}', None, BadRequest),
        (
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [2], "data": [1]}]}',
            None,
            BadRequest,
        ),
        (b'{"inputs": []}', "999", BadRequest),
        (b'{"inputs": []}', "0", BadRequest),
    ],
)
def test_malformed_requests(body: bytes, length: str | None, error: type) -> None:
    with pytest.raises(error):
        parse_infer_request(body, length)


@pytest.mark.parametrize(
    ("model", "tensor", "message"),
    [
        (TABULAR, {"name": "input", "datatype": "BYTES", "shape": [1], "data": ["x"]}, "FP32"),
        (TABULAR, {"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}, "shape"),
        (
            TABULAR,
            {"name": "other", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
            "'input'",
        ),
        (EMBEDDER, {"name": "text", "datatype": "INT32", "shape": [1], "data": [1]}, "BYTES"),
        (
            EMBEDDER,
            {"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]},
            "shape",
        ),
    ],
)
def test_inputs_that_do_not_fit_the_model(model: Manifest, tensor: dict, message: str) -> None:
    request = parse_infer_request(json.dumps({"inputs": [tensor]}).encode(), None)
    with pytest.raises(InvalidInput, match=message):
        to_model_inputs(model, request)


def test_unknown_requested_output() -> None:
    body = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
        "outputs": [{"name": "nope"}],
    }
    request = parse_infer_request(json.dumps(body).encode(), None)
    with pytest.raises(InvalidInput, match="no output 'nope'"):
        to_model_inputs(EMBEDDER, request)


@pytest.mark.parametrize(
    ("raw", "size", "message"),
    [
        (b"\x05\x00\x00\x00ab", 6, "runs past the end"),
        (b"\x02\x00", 2, "truncated"),
        (b"\x01\x00\x00\x00a\x01\x00\x00\x00b", 10, "5 bytes of BYTES data after the 1 elements"),
        (b"\x01\x00\x00\x00a", 9, "only 5 bytes remain"),
        (b"\x01\x00\x00\x00aXX", 5, "2 bytes of binary data after"),
    ],
)
def test_malformed_binary_bytes(raw: bytes, size: int, message: str) -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "t",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    ).encode()
    with pytest.raises(BadRequest, match=message):
        parse_infer_request(head + raw, len(head))
