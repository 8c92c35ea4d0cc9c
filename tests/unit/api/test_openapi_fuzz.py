"""A bounded schemathesis run against the real app's /openapi.json (issue 15 §7).

Every operation in the document (native, V2, management), with auth on (tenants
configured: inference routes are called with a tenant's key, the rest with the management
admin key), examples, coverage and fuzzing phases: no response is a 500 and every error
is the JSON `{"error", "code"}` envelope. The models the document's examples name are
published (tiny versions of the demo fleet's), so the fuzzer gets past the 404s.

The run is bounded (examples per operation below, a deadline per example) so it stays in
the default suite. (schemathesis's own pytest plugin does not run under pytest 9, so
the cases come from each operation's hypothesis strategy, positive and negative.)
"""

from __future__ import annotations

import re
from collections import Counter

import fsspec
import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from devstack.demo_fleet import TEXT_CLASSIFIERS, write_fraud_model, write_text_classifier
from serve_app.api.app import create_app
from serve_app.api.auth import Authorizer
from serve_app.api.params import MODEL_ID_PATTERN, NAME_PATTERN, VERSION_PATTERN
from serve_app.auth.keys import hash_key
from serve_app.auth.settings import AuthConfig
from serve_app.auth.tenants import Tenants
from serve_app.config import HostConfig, IngressConfig, ManagementConfig, StoreConfig
from serve_app.errors import InvalidModelId
from serve_app.gateway.gateway import Gateway
from serve_app.host.model_host import ModelHost
from serve_app.loading.architectures import MlpSpec
from serve_app.management.manager import ModelManager
from serve_app.management.pins import MemoryKeyValue, PinStore
from serve_app.storage.manifest import validate_model_id
from serve_app.storage.publisher import publish_path
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore
from tests.support import MB, LocalHostControl

ADMIN_KEY = "fuzz-admin-key-0123456789"
TENANT_KEY = "fuzz-tenant-key-0123456789"
# NOTE: the one place the fuzzer's credentials are set: a tenant's key (scope: every model)
# on the inference routes, the admin key on management and the admin-only reports.
TENANT_HEADERS = {"Authorization": f"Bearer {TENANT_KEY}"}
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
INFERENCE_PATHS = ("/v1/predict", "/v1/models/{model_id}/predict", "/v2/models/{model}")


def auth_headers(path: str) -> dict[str, str]:
    """The credentials an operation on `path` is called with."""
    return TENANT_HEADERS if path.startswith(INFERENCE_PATHS) else ADMIN_HEADERS


EXAMPLES_PER_OPERATION = 25
FRAUD = MlpSpec(input_dim=32, hidden_dims=[8], output_dim=1)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """The real app over real hosts and an in-memory store holding demo-fleet ids."""
    tmp = tmp_path_factory.mktemp("fuzz")
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    store = ModelStore(StoreConfig(url="s3://fleet/fuzz", chunk_bytes=MB), fs=fs)
    publish_path(store, write_fraud_model(tmp / "f1", 1, spec=FRAUD), "fraud-merchant-0001", "1")
    spec = next(s for s in TEXT_CLASSIFIERS if s.model_id == "text-clf-sentiment")
    publish_path(store, write_text_classifier(tmp / "clf", spec), spec.model_id, "1")
    host = ModelHost(
        HostConfig(memory_budget=64 * MB, disk_cache_dir=str(tmp / "disk"), accelerator="cpu"),
        store,
        replica="fuzz",
    )
    registry = Registry(store, refresh_s=3600)
    registry.refresh()
    gateway = Gateway(registry, host.predict, IngressConfig(max_batch_rows=64))
    manager = ModelManager(
        registry, LocalHostControl({"fuzz": host}), PinStore(MemoryKeyValue(), "f")
    )
    auth = AuthConfig.model_validate(
        {"tenants": [{"name": "fuzz", "key_hashes": [hash_key(TENANT_KEY)], "models": ["*"]}]}
    )
    tenants = Tenants(
        auth, hash_key(ADMIN_KEY), registry, is_alias=lambda _name: False, resident=frozenset
    )
    return create_app(
        gateway,
        max_body_bytes=256 * 1024,
        manager=manager,
        management=ManagementConfig(admin_key=ADMIN_KEY),
        auth=Authorizer(tenants),
    )


def errors_are_json(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every 4xx/5xx is `{"error": <str>, "code": <snake_case str>}` JSON."""
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict), response.text
    assert set(body) == {"error", "code"}, body
    assert isinstance(body["error"], str)
    assert "Traceback" not in body["error"]
    assert isinstance(body["code"], str)
    assert body["code"].replace("_", "").isalpha(), body
    assert body["code"].islower(), body


def fuzz(operation: object, mode: GenerationMode, rejected: Counter[str]) -> list[str]:
    """Run `EXAMPLES_PER_OPERATION` generated cases of `mode`; return the failures."""
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))  # type: ignore[attr-defined]
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: schemathesis.Case) -> None:
        headers = auth_headers(case.operation.path)
        response = case.call(headers=headers)
        if mode is GenerationMode.POSITIVE and response.status_code in (400, 422):
            rejected[case.operation.label] += 1
        try:
            case.validate_response(
                response, checks=[not_a_server_error, errors_are_json], headers=headers
            )
        except (AssertionError, schemathesis.FailureGroup) as exc:
            failures.append(f"{case.operation.label} ({mode}): {exc}\n  {case.as_curl_command()}")

    try:
        run()
    except Unsatisfiable:
        # NOTE: an operation with nothing to send (no parameters, no body) has no
        # negative cases.
        assert mode is GenerationMode.NEGATIVE
    return failures


def test_no_500_and_every_error_is_json(app: FastAPI) -> None:
    api_schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    rejected: Counter[str] = Counter()
    labels = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures.extend(fuzz(operation, mode, rejected))
    print(f"\n{len(labels)} operations fuzzed; schema-valid cases the server refused (400/422):")
    for label, count in rejected.most_common():
        print(f"  {count:3d}  {label}")
    assert any(label.startswith("POST /v2/models/{model}/infer") for label in labels)
    assert any(label.startswith("PUT /v1/models/{model_id}/pin") for label in labels)
    assert not failures, "\n".join(failures[:10])


async def test_documented_examples_reach_real_models(app: FastAPI) -> None:
    """The document's own examples (ids, bodies) get a 200, not a 404."""
    document = app.openapi()
    model = document["paths"]["/v2/models/{model}/infer"]["post"]["parameters"][0]["schema"]
    model_id = model["examples"][0]

    def example(path: str) -> dict:
        content = document["paths"][path]["post"]["requestBody"]["content"]
        return content["application/json"]["example"]

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://f", headers=TENANT_HEADERS
    ) as client:
        v2 = await client.post(
            f"/v2/models/{model_id}/infer", json=example("/v2/models/{model}/infer")
        )
        assert v2.status_code == 200, v2.text
        native = await client.post(
            f"/v1/models/{model_id}/predict", json=example("/v1/models/{model_id}/predict")
        )
        assert native.status_code == 200, native.text
        # auth is on: the same call without the tenant's key is refused
        anonymous = await client.post(
            f"/v1/models/{model_id}/predict",
            json=example("/v1/models/{model_id}/predict"),
            headers={"Authorization": ""},
        )
        assert anonymous.status_code == 401, anonymous.text


def test_every_path_parameter_is_declared_with_the_enforced_pattern(app: FastAPI) -> None:
    document = app.openapi()
    checked = 0
    for path, operations in document["paths"].items():
        names = re.findall(r"{(\w+)}", path)
        for method, operation in operations.items():
            declared = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "path"}
            assert set(declared) == set(names), f"{method.upper()} {path}"
            for name in names:
                pattern = declared[name]["schema"]["pattern"]
                assert pattern in {NAME_PATTERN, MODEL_ID_PATTERN, VERSION_PATTERN}
                checked += 1
    assert checked >= 25
    # the patterns accept exactly what the server's own checks accept
    for candidate in ["m-a", "a..b", "..", "x" * 128, "x" * 129, "-a", "a@1", "a/b", "é"]:
        try:
            validate_model_id(candidate)
            valid = True
        except InvalidModelId:
            valid = False
        assert bool(re.fullmatch(MODEL_ID_PATTERN, candidate)) is valid, candidate
