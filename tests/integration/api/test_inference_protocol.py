"""Open Inference Protocol v2 against the real stack, with the real `tritonclient[http]`.

Client defaults everywhere unless a test says otherwise: binary inputs, and (with no
requested outputs) `binary_data_output`. Answers are compared with the models run directly.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator

import httpx
import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serve_app.storage.manifest import Manifest
from tests.integration.reference import TEXTS, assert_same, expected, rows_for
from tests.support import ADMIN, CLASSIFIERS, FleetApp, fraud_ids, wait_for


@pytest.fixture(scope="module")
def client(app: FleetApp) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=app.url.removeprefix("http://"))
    yield client
    client.close()


def tabular_input(
    rows: np.ndarray, binary: bool = True, datatype: str = "FP32"
) -> triton.InferInput:
    tensor = triton.InferInput("input", list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows, binary_data=binary)
    return tensor


def text_input(texts: list[str], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary)
    return tensor


def test_server_and_model_metadata(
    client: triton.InferenceServerClient, fleet: dict[str, Manifest]
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "fleetserve"
    assert {"binary_tensor_data", "model_repository"} <= set(server["extensions"])
    model = fraud_ids()[1]
    assert client.is_model_ready(model)
    assert client.is_model_ready("minilm-embed", "1")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata(model)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 32]}]
    assert meta["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1]}]
    embed = client.get_model_metadata("minilm-embed", "2")
    assert embed["versions"] == ["1", "2"]
    assert embed["inputs"][0]["datatype"] == "BYTES"
    clf = client.get_model_metadata(CLASSIFIERS[0].model_id)
    assert [o["name"] for o in clf["outputs"]] == ["label", "score", "scores"]


@pytest.mark.parametrize(
    ("binary_in", "binary_out"), [(True, None), (False, False), (True, False), (False, True)]
)
def test_tabular_binary_and_json_both_ways(
    client: triton.InferenceServerClient, binary_in: bool, binary_out: bool | None
) -> None:
    model = fraud_ids()[2]
    rows = rows_for(model, 4)
    outputs = None if binary_out is None else [triton.InferRequestedOutput("score", binary_out)]
    result = client.infer(
        model,
        [tabular_input(np.array(rows, dtype=np.float32), binary_in)],
        outputs=outputs,
        request_id="req-1",
    )
    assert result.get_response()["id"] == "req-1"
    assert result.get_response()["model_version"] == "1"
    want = expected(model, np.array(rows, dtype=np.float32).tolist())
    assert result.as_numpy("score").tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_inputs(client: triton.InferenceServerClient, datatype: str) -> None:
    model = fraud_ids()[2]
    dtype = np.float16 if datatype == "FP16" else ml_dtypes.bfloat16
    rows = np.array(rows_for(model, 2), dtype=np.float32).astype(dtype)
    result = client.infer(model, [tabular_input(rows, True, datatype)])
    want = expected(model, rows.astype(np.float32).tolist())
    assert result.as_numpy("score").tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_text_classifier_bytes_in_labels_out(client: triton.InferenceServerClient) -> None:
    model = CLASSIFIERS[0].model_id
    result = client.infer(model, [text_input(TEXTS)])  # binary in, binary out
    want = expected(model, TEXTS)
    assert [b.decode() for b in result.as_numpy("label")] == [w["label"] for w in want]
    assert result.as_numpy("score").tolist() == pytest.approx([w["score"] for w in want], rel=1e-4)
    scores = result.as_numpy("scores")
    assert scores.shape == (2, len(CLASSIFIERS[0].labels))
    as_json = client.infer(
        model,
        [text_input(TEXTS, binary=False)],
        outputs=[triton.InferRequestedOutput("label", binary_data=False)],
    )
    assert list(as_json.as_numpy("label")) == [w["label"] for w in want]  # JSON: str
    assert as_json.as_numpy("score") is None  # filtered out


def test_embedder_with_compression_both_ways(client: triton.InferenceServerClient) -> None:
    result = client.infer(
        "minilm-embed",
        [text_input(TEXTS, binary=False)],
        model_version="1",
        request_compression_algorithm="gzip",
        response_compression_algorithm="gzip",
    )
    vectors = result.as_numpy("embedding")
    assert vectors.shape == (2, 384)
    assert_same("minilm-embed", vectors.tolist(), expected("minilm-embed", TEXTS))
    deflated = client.infer(
        "minilm-embed", [text_input(TEXTS)], request_compression_algorithm="deflate"
    )
    assert np.allclose(deflated.as_numpy("embedding"), vectors, atol=1e-5)


def test_plain_json_without_content_type(app: FleetApp) -> None:
    """What `curl -d` sends: JSON, nested data, no content type header."""
    model = fraud_ids()[2]
    rows = rows_for(model, 2)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 32], "data": rows}]}
    response = httpx.post(
        f"{app.url}/v2/models/{model}/infer",
        content=gzip.compress(json.dumps(body).encode()),
        headers={"Content-Encoding": "gzip"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    (score,) = response.json()["outputs"]
    assert score["data"] == pytest.approx(expected(model, rows), rel=1e-5)


@pytest.mark.parametrize(
    ("model", "make_input", "status", "fragment"),
    [
        (
            "no-such-model",
            lambda: tabular_input(np.zeros((1, 32), np.float32)),
            "404",
            "not published",
        ),
        (
            fraud_ids()[3],
            lambda: tabular_input(np.zeros((1, 32), np.int32), datatype="INT32"),
            "422",
            "FP32",
        ),
        (fraud_ids()[3], lambda: tabular_input(np.zeros((1, 31), np.float32)), "422", "shape"),
        (
            "minilm-embed",
            lambda: tabular_input(np.zeros((1, 32), np.float32)),
            "422",
            "takes one input 'text'",
        ),
    ],
)
def test_errors_reach_the_client(
    client: triton.InferenceServerClient, model: str, make_input, status: str, fragment: str
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [make_input()])
    assert caught.value.status() == status
    assert fragment in caught.value.message()


def test_repository_index_load_unload(app: FleetApp, client: triton.InferenceServerClient) -> None:
    model = fraud_ids()[5]
    client.unload_model(model, headers=ADMIN)
    index = {
        (e["name"], e.get("version")): e for e in client.get_model_repository_index(headers=ADMIN)
    }
    assert index[(model, "1")]["state"] == "UNAVAILABLE"
    assert index[("minilm-embed", "2")]
    started = time.monotonic()
    client.load_model(model, headers=ADMIN)
    loaded_s = time.monotonic() - started
    ready = {
        e["name"] for e in client.get_model_repository_index(headers=ADMIN) if e["state"] == "READY"
    }
    assert model in ready
    holders = [
        r["replica"] for r in app.replicas() for m in r["models"] if m["key"] == f"{model}@1"
    ]
    assert len(holders) == 1
    client.unload_model(model, headers=ADMIN)
    wait_for(
        lambda: all(m["key"] != f"{model}@1" for r in app.replicas() for m in r["models"]),
        10,
        f"{model} gone from every replica",
    )
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("no-such-model", headers=ADMIN)
    assert caught.value.status() == "404"
    print(f"\nrepository load of {model}: {loaded_s * 1000:.0f} ms")
