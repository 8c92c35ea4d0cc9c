"""Hostile bodies on both APIs (issue 15 §3): every one is a cheap 4xx JSON answer.

The model is resolved before the body is read (an unknown model is a 404 whatever the
body), a tensor over the model's element limit is refused on its shape, deep nesting,
zero-size shapes with huge dimensions and mistyped parameters are 400s, and compressed
bodies must end cleanly.
"""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from collections.abc import AsyncIterator

import httpx
import pytest

from serve_app.api.app import create_app
from serve_app.api.body import OFF_LOOP_BYTES, decompress, off_loop
from serve_app.api.json_text import structural_tokens
from serve_app.api.v2_codec import HEADER_LENGTH, parse_infer_request
from serve_app.api.v2_header import EarlyCheck
from serve_app.config import ManagementConfig
from serve_app.errors import BadRequest
from serve_app.gateway.gateway import Gateway
from serve_app.host.model_host import ModelHost
from serve_app.management.manager import ModelManager
from serve_app.management.pins import MemoryKeyValue, PinStore
from tests.support import ADMIN, ADMIN_KEY, LocalHostControl

LIMIT = 8 * 2**20
ROW = [0.1, -0.2, 0.3, 0.4]
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture
async def big(gateway: Gateway, host: ModelHost) -> AsyncIterator[httpx.AsyncClient]:
    """The app with the production body limit (8 MiB) and management (the suite's admin
    key, which the client sends: management fails closed without one)."""
    manager = ModelManager(
        gateway.registry, LocalHostControl({"unit": host}), PinStore(MemoryKeyValue(), "fleet")
    )
    management = ManagementConfig(admin_key=ADMIN_KEY)
    app = create_app(gateway, max_body_bytes=LIMIT, manager=manager, management=management)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://f", headers=ADMIN) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code"}
    if code is not None:
        assert body["code"] == code
    return body["error"]


def bytes_request(count: int, raw: bytes, name: str = "input") -> tuple[bytes, str]:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": "BYTES",
                    "shape": [count],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return head + raw, str(len(head))


@pytest.mark.parametrize(
    ("path", "content", "headers"),
    [
        ("/v2/models/nope/infer", b"{not json", {}),
        ("/v2/models/nope/infer", b"{}", {HEADER_LENGTH: "999"}),
        ("/v2/models/nope/infer", b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}),
        ("/v2/models/m-a/versions/9/infer", b"{not json", {}),
        ("/v1/models/nope/predict", b"{not json", {}),
        ("/v1/models/nope/predict", DEEP, {}),
    ],
)
async def test_unknown_model_is_404_whatever_the_body(
    big: httpx.AsyncClient, path: str, content: bytes, headers: dict[str, str]
) -> None:
    response = await big.post(path, content=content, headers=headers)
    code = "version_not_found" if "versions" in path else "model_not_found"
    assert_error(response, 404, code)


async def test_a_gzip_bomb_over_the_element_limit_is_refused_on_its_shape(
    big: httpx.AsyncClient,
) -> None:
    """~8 KB of gzip inflating to 8 MiB: 2M empty BYTES elements."""
    count = (LIMIT - 200) // 4
    body, length = bytes_request(count, bytes(count * 4))
    packed = gzip.compress(body, 9)
    assert len(packed) < 10_000
    response = await big.post(
        "/v2/models/m-a/infer",
        content=packed,
        headers={"Content-Encoding": "gzip", HEADER_LENGTH: length},
    )
    message = assert_error(response, 400, "bad_request")
    assert "elements allowed for one tensor of this model" in message


async def test_bytes_past_the_declared_shape_are_never_walked(big: httpx.AsyncClient) -> None:
    count = (LIMIT - 200) // 4
    body, length = bytes_request(1, bytes(count * 4))
    response = await big.post("/v2/models/m-a/infer", content=body, headers={HEADER_LENGTH: length})
    message = assert_error(response, 400, "bad_request")
    assert f"{(count - 1) * 4} bytes of BYTES data after the 1 elements" in message


def test_element_limit_is_checked_before_any_data() -> None:
    # 3 elements declared, the limit is 2: refused although the data is absent/garbage.
    body, length = bytes_request(3, b"\xff" * 7)
    with pytest.raises(BadRequest, match="elements allowed"):
        parse_infer_request(body, length, max_elements=2)


@pytest.mark.parametrize(
    "shape", [[0, 10**30], [0, 2**40, 2**40], [10**30, 0], [0, 2**31, 2**31, 2**31]]
)
async def test_zero_size_shapes_with_huge_dimensions(
    big: httpx.AsyncClient, shape: list[int]
) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": []}]}
    response = await big.post("/v2/models/m-a/infer", json=body)
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("/v2/models/m-a/infer", DEEP),
        ("/v2/models/m-a/infer", b'{"inputs": [], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("/v1/models/m-a/predict", DEEP),
        ("/v1/models/m-a/predict", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("/v1/models/m-a/predict", b'{"inputs": [[' + b"1" * 5000 + b"]]}"),
        ("/v2/models/m-a/infer", b'{"id": ' + b"9" * 5000 + b"}"),
        ("/v2/repository/index", DEEP),
    ],
)
async def test_deep_nesting_and_huge_numbers_are_400(
    big: httpx.AsyncClient, path: str, content: bytes
) -> None:
    assert_error(await big.post(path, content=content), 400)


async def test_deeply_nested_tensor_data_is_400(big: httpx.AsyncClient) -> None:
    data: list = [1.0]
    for _ in range(50):
        data = [data]
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": data}]}
    assert "nested deeper" in assert_error(
        await big.post("/v2/models/m-a/infer", json=body), 400, "bad_request"
    )


def tabular(**extra: object) -> dict:
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": ROW}],
        **extra,
    }


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v2/models/m-a/infer", tabular(parameters={"binary_data_output": "yes"})),
        ("/v2/models/m-a/infer", tabular(parameters=[1, 2])),
        ("/v2/models/m-a/infer", tabular(outputs=[{"name": "score", "parameters": "x"}])),
        (
            "/v2/models/m-a/infer",
            tabular(outputs=[{"name": "score", "parameters": {"binary_data": 1}}]),
        ),
        ("/v2/repository/models/m-a/load", {"parameters": [1]}),
        ("/v2/repository/models/m-a/load", {"parameters": "config"}),
    ],
)
async def test_mistyped_parameters_are_400(big: httpx.AsyncClient, path: str, body: dict) -> None:
    assert "parameter" in assert_error(await big.post(path, json=body), 400, "bad_request")


async def test_a_well_formed_request_still_works(big: httpx.AsyncClient) -> None:
    response = await big.post(
        "/v2/models/m-a/infer", json=tabular(parameters={"binary_data_output": False})
    )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1]


@pytest.mark.parametrize(
    ("packed", "message"),
    [
        (gzip.compress(b'{"inputs": []}')[:-6], "truncated"),
        (gzip.compress(b'{"inputs": []}') + b"garbage", "after the end"),
        (gzip.compress(b'{"inputs": []}') * 2, "second gzip member"),
        (b"", "truncated"),
    ],
)
def test_gzip_must_end_cleanly(packed: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decompress(packed, "gzip", LIMIT)


@pytest.mark.parametrize(
    "packed", [zlib.compress(b'{"inputs": []}')[:-2], zlib.compress(b"{}") + b"\x00"]
)
def test_deflate_must_end_cleanly(packed: bytes) -> None:
    with pytest.raises(BadRequest):
        decompress(packed, "deflate", LIMIT)


async def test_trailing_gzip_garbage_over_http_is_400(big: httpx.AsyncClient) -> None:
    packed = gzip.compress(json.dumps(tabular()).encode()) + b"\x00junk"
    response = await big.post(
        "/v2/models/m-a/infer", content=packed, headers={"Content-Encoding": "gzip"}
    )
    assert "after the end" in assert_error(response, 400, "bad_request")


@pytest.mark.parametrize("value", ["+12", " 12", "12 ", "1_2", "\u0661\u0662", "0x1", "-1"])
def test_header_length_is_ascii_digits_only(value: str) -> None:
    body = b'{"inputs": []}'.ljust(12) + b"x" * 20
    with pytest.raises(BadRequest, match="ASCII digits"):
        parse_infer_request(body, value)


async def test_large_decodes_run_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    assert await off_loop(OFF_LOOP_BYTES - 1, threading.get_ident) == loop_thread
    assert await off_loop(OFF_LOOP_BYTES, threading.get_ident) != loop_thread


def json_bomb(kind: str, size: int = LIMIT - 200) -> bytes:
    """~8 KB of gzip that inflates to `size` bytes of JSON values in one tensor."""
    unit = b"0," if kind == "numbers" else b"[],"
    head = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": ['
    values = unit * ((size - len(head)) // len(unit))
    return head + values + b"0]}]}"


@pytest.mark.parametrize("kind", ["numbers", "empties"])
@pytest.mark.parametrize("path", ["/v2/models/m-a/infer", "/v1/models/m-a/predict"])
async def test_json_bombs_are_refused_before_they_are_parsed(
    big: httpx.AsyncClient, kind: str, path: str
) -> None:
    """`[0,0,...]` / `[[],[],...]` of 8 MiB: json.loads would take 0.2-0.5 s of CPU."""
    raw = json_bomb(kind)
    if path.startswith("/v1"):
        raw = b'{"inputs": [' + (b"0," if kind == "numbers" else b"[],") * (LIMIT // 4) + b"0]}"
    packed = gzip.compress(raw, 9)
    headers = {"Content-Encoding": "gzip"} if path.startswith("/v2") else {}
    response = await big.post(path, content=packed if headers else raw, headers=headers)
    assert "element limit" in assert_error(response, 400)


def test_structural_tokens_skip_strings_and_escapes() -> None:
    assert structural_tokens(b'["a,b", "c[d", 1]', 0) == 3
    assert structural_tokens(b'["a\\",[,", 2]', 0) == 2  # escaped quote stays in the string
    assert structural_tokens(b'["a\\\\", [1, 2]]', 0) == 4  # escaped backslash ends it
    assert structural_tokens(b'{"k": "x,y,z"}', 0) == 1


async def test_texts_full_of_commas_are_not_mistaken_for_values(
    big: httpx.AsyncClient,
) -> None:
    """Commas inside strings never count against the budget (m-a is tabular: a 422 for
    texts, but after the body was parsed, not a 400 before)."""
    body = {"inputs": ["a, " * 20_000, "b, " * 20_000]}
    response = await big.post("/v1/models/m-a/predict", json=body)
    assert_error(response, 422, "invalid_input")


@pytest.mark.parametrize("kind", ["bytes", "json"])
def test_a_refused_body_is_never_inflated_in_full(kind: str) -> None:
    """The header (or the token budget) is checked while the body inflates."""
    if kind == "bytes":
        count = (LIMIT - 200) // 4
        body, length = bytes_request(count, bytes(count * 4))
    else:
        body, length = json_bomb("numbers"), None
    inflated: list[int] = []
    check = EarlyCheck(length, max_elements=4096)

    def inspect(piece: bytes) -> None:
        inflated.append(len(piece))
        check(piece)

    with pytest.raises(BadRequest, match="element"):
        decompress(gzip.compress(body, 9), "gzip", LIMIT, inspect)
    assert sum(inflated) <= 128 * 1024 < len(body)


def test_inspect_sees_every_byte_of_a_good_body() -> None:
    raw = json.dumps(tabular()).encode() * 3000
    pieces: list[bytes] = []
    assert decompress(gzip.compress(raw), "gzip", LIMIT, pieces.append) == raw
    assert b"".join(pieces) == raw
    assert len(pieces) > 1
