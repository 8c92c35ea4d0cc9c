"""Property tests of the V2 codec against tritonclient's own encoders and decoders.

Random datatypes, shapes and values, binary and JSON tensor data, gzip/deflate/none:
whatever `tritonclient.http` puts on the wire, `parse_infer_request` reads back exactly,
and whatever `encode_infer_response` writes, tritonclient's `InferResult` reads back
exactly (compressed responses too).
"""

from __future__ import annotations

import contextlib
import gzip
import zlib

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serve_app.api.body import compress, decompress
from serve_app.api.v2_codec import (
    InferRequest,
    RequestedOutput,
    Tensor,
    encode_infer_response,
    parse_infer_request,
)
from serve_app.errors import BadRequest

NUMERIC = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
BINARY_ONLY = {"FP16", "BF16"}  # this server refuses them as JSON
SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    """A (datatype, array) pair tritonclient can send."""
    datatype = draw(st.sampled_from([*NUMERIC, "BYTES"]))
    shape = draw(SHAPES)
    if datatype == "BYTES":
        count = int(np.prod(shape))
        items = draw(st.lists(st.binary(max_size=12), min_size=count, max_size=count))
        array = np.empty(count, dtype=object)
        array[:] = items
        return datatype, array.reshape(shape)
    dtype = NUMERIC[datatype]
    if datatype == "BF16":
        values = draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32)))
        return datatype, values.astype(dtype)
    return datatype, draw(hnp.arrays(dtype, shape))


def same(left: np.ndarray, right: np.ndarray) -> bool:
    if left.shape != right.shape:
        return False
    if left.dtype.kind == "f" or left.dtype == NUMERIC["BF16"]:
        return bool(
            np.array_equal(left.astype(np.float64), right.astype(np.float64), equal_nan=True)
        )
    return bool(np.array_equal(left, right))


def packed(body: bytes, encoding: str | None) -> bytes:
    """What tritonclient's `infer(request_compression_algorithm=...)` sends."""
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    return body


@SETTINGS
@given(
    st.lists(tensors(), min_size=1, max_size=3),
    st.lists(st.booleans(), min_size=3, max_size=3),
    st.sampled_from([None, "gzip", "deflate"]),
)
def test_requests_tritonclient_encodes_decode_exactly(
    drawn: list[tuple[str, np.ndarray]], binary: list[bool], encoding: str | None
) -> None:
    inputs = []
    for i, (datatype, array) in enumerate(drawn):
        as_binary = binary[i] or datatype in BINARY_ONLY
        if datatype == "BYTES" and not as_binary:
            # NOTE: JSON carries BYTES as strings: tritonclient needs UTF-8 elements.
            try:
                [bytes(v).decode("utf-8") for v in array.ravel()]
            except UnicodeDecodeError:
                as_binary = True
        tensor = triton.InferInput(f"t{i}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=as_binary)
        inputs.append(tensor)
    body, header_length = triton.InferenceServerClient.generate_request_body(
        inputs, request_id="r-1"
    )
    raw = decompress(packed(body, encoding), encoding, 2**24)
    request = parse_infer_request(raw, None if header_length is None else str(header_length))
    assert request.id == "r-1"
    assert [t.name for t in request.inputs] == [f"t{i}" for i in range(len(drawn))]
    for tensor, (datatype, array) in zip(request.inputs, drawn, strict=True):
        assert tensor.datatype == datatype
        if datatype == "BYTES":
            assert tensor.data.shape == array.shape
            assert [bytes(v) for v in tensor.data.ravel()] == list(array.ravel())
        else:
            assert same(tensor.data.astype(NUMERIC[datatype]), array)


@SETTINGS
@given(tensors(), st.booleans(), st.sampled_from([None, "gzip", "deflate"]))
def test_responses_decode_exactly_in_tritonclient(
    drawn: tuple[str, np.ndarray], binary: bool, encoding: str | None
) -> None:
    datatype, array = drawn
    binary = binary or datatype in BINARY_ONLY
    data = array.astype(np.float32) if datatype == "BF16" else array
    request = InferRequest(inputs=[], outputs=[RequestedOutput("out", binary)])
    body, header_length = encode_infer_response("m", "1", request, [Tensor("out", datatype, data)])
    sent, used = compress(body, encoding)
    result = triton.InferResult.from_response_body(
        sent, header_length=header_length, content_encoding=used
    )
    got = result.as_numpy("out")
    if datatype == "BYTES":
        want = list(array.ravel())
        if not binary:  # JSON: strings (invalid UTF-8 replaced)
            want = [bytes(v).decode("utf-8", errors="replace") for v in want]
        assert list(got.ravel()) == want
        assert got.shape == array.shape
    else:
        assert same(got.astype(NUMERIC[datatype]), array)


@SETTINGS
@given(tensors(), st.integers(min_value=1, max_value=64))
def test_element_limit_holds_for_every_tensor(
    drawn: tuple[str, np.ndarray], max_elements: int
) -> None:
    """Refused exactly when the shape spans more than the limit (a 0 dimension counts as
    1, so [0, 10**30] is refused too: numpy could not even shape it)."""
    datatype, array = drawn
    spanned = int(np.prod([d or 1 for d in array.shape]))
    tensor = triton.InferInput("t", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    if spanned > max_elements:
        with pytest.raises(BadRequest, match="elements allowed"):
            parse_infer_request(body, str(header_length), max_elements)
    else:
        parse_infer_request(body, str(header_length), max_elements)


@SETTINGS
@given(tensors(), st.data())
def test_corrupted_binary_requests_are_400_never_a_crash(
    drawn: tuple[str, np.ndarray], data: st.DataObject
) -> None:
    datatype, array = drawn
    tensor = triton.InferInput("t", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    cut = data.draw(st.integers(min_value=0, max_value=len(body)))
    flip = data.draw(st.integers(min_value=0, max_value=max(len(body) - 1, 0)))
    mangled = bytearray(body[:cut] + body[cut + 1 :])
    if mangled:
        mangled[min(flip, len(mangled) - 1)] ^= 0x5A
    with contextlib.suppress(BadRequest):
        parse_infer_request(bytes(mangled), str(header_length))
