"""Ray's internals that fleetserve uses are all in `deployments/ray_internals.py`, and each
still exists with the shape used there; a Ray upgrade that moves one fails here, naming it.

Also the Serve extension points the router and the hosts rely on (public, but alpha): the
request-router API and the `record_routing_stats` hook. No Ray is started."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import ray

ROOT = Path(__file__).resolve().parents[3]
INTERNALS = "deployments/ray_internals.py"
FORBIDDEN = (
    "ray._private",
    "ray.serve._private",
    "ray.experimental.internal_kv",
    "ray.serve.context._get_global_client",
)


def _moved(what: str) -> str:
    return f"Ray {ray.__version__} moved {what}: update {INTERNALS}"


def _attr(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{_moved(f'{module}.{name}')} ({exc})")


def _params(func: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(func).parameters)


# ----------------------------------------------------------- the internals module's symbols


@pytest.mark.parametrize("name", ["get", "put", "del", "list"])
def test_internal_kv_functions(name: str) -> None:
    func = _attr("ray.experimental.internal_kv", f"_internal_kv_{name}")
    params = _params(func)
    first = "prefix" if name == "list" else "key"
    assert next(iter(params)) == first, _moved(f"_internal_kv_{name}'s first argument")
    assert "namespace" in params, _moved(f"_internal_kv_{name}'s namespace argument")
    if name == "put":
        assert {"value", "overwrite"} <= set(params), _moved("_internal_kv_put's arguments")


def test_request_routing_info_takes_replica_and_model_ids() -> None:
    info_cls = _attr("ray.serve._private.common", "RequestRoutingInfo")
    fields = {f.name for f in dataclasses.fields(info_cls)}
    assert {"replica_id", "multiplexed_model_ids"} <= fields, _moved("RequestRoutingInfo fields")
    from ray.serve.request_router import ReplicaID

    replica_id = ReplicaID(unique_id="r1", deployment_id=_deployment_id())
    info = info_cls(replica_id=replica_id, multiplexed_model_ids=["m@1"])
    assert info.multiplexed_model_ids == ["m@1"]


def test_controller_client_records_routing_info() -> None:
    get_client = _attr("ray.serve.context", "_get_global_client")
    assert callable(get_client), _moved("ray.serve.context._get_global_client")
    client_cls = _attr("ray.serve._private.client", "ServeControllerClient")
    method = getattr(client_cls, "record_request_routing_info", None)
    assert method is not None, _moved("ServeControllerClient.record_request_routing_info")
    assert list(_params(method))[1:] == ["info"], _moved("record_request_routing_info(info)")


def test_serve_namespace() -> None:
    namespace = _attr("ray.serve._private.constants", "SERVE_NAMESPACE")
    assert isinstance(namespace, str), _moved("SERVE_NAMESPACE")
    assert namespace, _moved("SERVE_NAMESPACE")


def test_serve_reads_the_throughput_settings_we_set() -> None:
    import ray.serve._private.constants as constants

    from deployments.ray_internals import SERVE_THROUGHPUT_ENV

    source = inspect.getsource(constants)
    for name in SERVE_THROUGHPUT_ENV:
        assert hasattr(constants, name), _moved(name)
        assert f'"{name}"' in source, _moved(f"the variable Serve reads for {name}")


def test_the_internals_module_imports() -> None:
    module = importlib.import_module("deployments.ray_internals")
    for name in module.__all__:
        assert hasattr(module, name), name


# ----------------------------------------------- the public extension points the code uses


def test_request_router_api() -> None:
    from ray.serve import request_router as api

    for name in (
        "FIFOMixin",
        "LocalityMixin",
        "MultiplexMixin",
        "PendingRequest",
        "ReplicaID",
        "RequestRouter",
        "RunningReplica",
    ):
        assert hasattr(api, name), f"Ray {ray.__version__}: ray.serve.request_router.{name} gone"
    for cls, members in (
        (api.RequestRouter, ("curr_replicas", "on_request_routed", "update_replicas")),
        (api.MultiplexMixin, ("apply_multiplex_routing",)),
        (api.LocalityMixin, ("apply_locality_routing",)),
        (api.RunningReplica, ("multiplexed_model_ids", "routing_stats", "replica_id")),
    ):
        for member in members:
            assert hasattr(cls, member), (
                f"Ray {ray.__version__}: {cls.__name__}.{member} gone: update deployments/router.py"
            )
    context_fields = {f.name for f in dataclasses.fields(api.PendingRequest)}
    assert "routing_context" in context_fields
    routing_context = api.PendingRequest.__dataclass_fields__["routing_context"].default_factory()
    for field in ("should_backoff", "tried_first_multiplexed_models"):
        assert hasattr(routing_context, field), (
            f"Ray {ray.__version__}: routing context lost {field}: update deployments/router.py"
        )


def test_routing_stats_hook_and_period() -> None:
    from ray.serve.config import RequestRouterConfig

    from deployments.model_host import ModelHostDeployment

    hook = _attr("ray.serve._private.constants", "REQUEST_ROUTING_STATS_METHOD")
    assert hook == "record_routing_stats", f"Ray {ray.__version__} calls {hook!r} for stats"
    assert hasattr(ModelHostDeployment.func_or_class, hook)
    assert "request_routing_stats_period_s" in RequestRouterConfig.model_fields


# ------------------------------------------------------- nobody else touches Ray internals


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _internal_uses(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Attribute):
            names = [_dotted(node)]
        found.update(n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))
    return found


def test_only_the_internals_module_touches_ray_internals() -> None:
    offenders = {}
    for package in ("serve_app", "deployments"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == INTERNALS:
                continue
            uses = _internal_uses(path)
            if uses:
                offenders[rel] = sorted(uses)
    assert not offenders, f"Ray internals used outside {INTERNALS} (wrap them there): {offenders}"


def test_the_check_sees_internal_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import ray.serve._private.constants\n"
        "from ray.experimental.internal_kv import _internal_kv_get\n"
        "from ray.serve.context import _get_global_client\n"
        "def f():\n"
        "    import ray\n"
        "    return ray.serve.context._get_global_client()\n"
        "from ray.serve.request_router import RequestRouter\n"
    )
    assert _internal_uses(sample) == {
        "ray.serve._private.constants",
        "ray.experimental.internal_kv",
        "ray.experimental.internal_kv._internal_kv_get",
        "ray.serve.context._get_global_client",
    }


def _deployment_id() -> Any:
    deployment_id = _attr("ray.serve._private.common", "DeploymentID")
    return deployment_id(name="ModelHost", app_name="fleet")
