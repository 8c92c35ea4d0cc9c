"""The KubeRay RayService (ops/kuberay/): generated from config.yaml and up to date, valid
against KubeRay's RayService CRD schema, and its serveConfigV2 valid for Serve and for
fleetserve's AppConfig, with the ingress on CPU workers and the hosts on GPU workers."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.cli import main
from serve_app.config import AppConfig
from serve_app.deploy.kuberay import (
    INGRESS_RESOURCE,
    RAY_VERSION,
    KubeRayOptions,
    render_manifest,
    serve_config,
)

ROOT = Path(__file__).resolve().parents[3]
MANIFEST = ROOT / "ops" / "kuberay" / "rayservice.yaml"
DOCKERFILE = ROOT / "ops" / "kuberay" / "Dockerfile"
CRD = ROOT / "ops" / "kuberay" / "crd" / "ray.io_rayservices.yaml"  # vendored, see its README


def _closed(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as `kubectl apply` (strict field
    validation) refuses them; plain JSON Schema would let a misspelt field through, and
    the API server would silently prune it."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.Validator:
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _closed(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def _errors(validator: jsonschema.Validator, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_the_committed_manifest_is_what_config_yaml_renders_to() -> None:
    assert MANIFEST.read_text() == render_manifest(ROOT / "config.yaml"), (
        "ops/kuberay/rayservice.yaml is out of date: run `fleetserve kuberay`"
    )


def test_kuberay_check_fails_on_drift_and_passes_when_current(tmp_path: Path) -> None:
    out = tmp_path / "rayservice.yaml"
    config = str(ROOT / "config.yaml")
    assert main(["--config", config, "kuberay", "-o", str(out)]) == 0
    assert main(["--config", config, "kuberay", "-o", str(out), "--check"]) == 0
    out.write_text(out.read_text().replace("max_batch_size: 32", "max_batch_size: 16"))
    assert main(["--config", config, "kuberay", "-o", str(out), "--check"]) == 1


def test_manifest_is_valid_against_the_rayservice_crd(
    validator: jsonschema.Validator, manifest: dict[str, Any]
) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    assert _errors(validator, manifest) == []


def _groups(m: dict[str, Any]) -> list[dict[str, Any]]:
    return m["spec"]["rayClusterConfig"]["workerGroupSpecs"]


BREAKAGES = {
    "misspelt field": (lambda m: m["spec"].update(serveConfig="x"), "serveConfig"),
    "wrong type": (lambda m: _groups(m)[0].update(maxReplicas="4"), "maxReplicas"),
    "missing required": (lambda m: _groups(m)[1].pop("template"), "template"),
    "bad enum": (
        lambda m: m["spec"]["rayClusterConfig"]["authOptions"].update(mode="password"),
        "password",
    ),
}


@pytest.mark.parametrize("where", sorted(BREAKAGES))
def test_the_schema_check_catches_what_kubernetes_would_refuse(
    validator: jsonschema.Validator, manifest: dict[str, Any], where: str
) -> None:
    change, expected = BREAKAGES[where]
    broken = copy.deepcopy(manifest)
    change(broken)
    errors = _errors(validator, broken)
    assert errors, f"{where} went through"
    assert any(expected in e for e in errors), errors


def test_serve_config_v2_parses_with_serves_schema_and_appconfig(
    manifest: dict[str, Any],
) -> None:
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve)
    assert schema.proxy_location == "EveryNode"
    assert schema.http_options.host == "0.0.0.0"
    (app,) = schema.applications
    assert app.name == "fleet"
    assert app.import_path == "deployments.builder:build_app"
    args = AppConfig.model_validate(app.args)
    assert [p.accelerator for p in args.pool_configs()] == ["cuda"]
    assert args.pool_configs()[0].memory_budget is None  # the GPU's fraction decides
    local = yaml.safe_load((ROOT / "config.yaml").read_text())["applications"][0]["args"]
    assert args.store.url == local["store"]["url"]
    assert args.host.batching.max_batch_size == local["host"]["batching"]["max_batch_size"]
    # the Ingress's scaling and placement go through the app's args (build_app applies
    # them), never a `deployments:` override that could disagree with them
    assert "Ingress" not in {d.name for d in app.deployments}
    assert args.ingress.autoscaling == local["ingress"]["autoscaling"]
    assert args.ingress.resources == {INGRESS_RESOURCE: 1}


def test_a_config_without_ingress_autoscaling_gets_it_on_kubernetes(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    ingress = data["applications"][0]["args"]["ingress"]
    ingress.pop("autoscaling")
    ingress["num_replicas"] = 2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    rendered = yaml.safe_load(render_manifest(path))
    serve = yaml.safe_load(rendered["spec"]["serveConfigV2"])
    args = AppConfig.model_validate(serve["applications"][0]["args"])
    assert args.ingress.autoscaling is not None
    assert args.ingress.autoscaling["min_replicas"] == 2
    assert args.ingress.resources == {INGRESS_RESOURCE: 1}


def test_ingress_on_cpu_workers_hosts_on_gpu_workers(manifest: dict[str, Any]) -> None:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    cpu, gpu = groups["cpu"], groups["gpu"]
    assert INGRESS_RESOURCE in cpu["resources"]  # only CPU workers offer it
    assert INGRESS_RESOURCE not in gpu.get("resources", {})
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in str(cpu["template"])
    local = AppConfig.model_validate(
        yaml.safe_load((ROOT / "config.yaml").read_text())["applications"][0]["args"]
    )
    assert gpu["replicas"] == local.host.num_replicas  # one GPU per host replica
    assert cluster["enableInTreeAutoscaling"] is True


def test_every_ray_pod_gets_s3_and_admin_keys_from_secrets_and_is_scraped(
    manifest: dict[str, Any],
) -> None:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        template = group["template"]
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "fleet-s3", "key": name, **ref}
            assert "value" not in env[name]  # never a literal secret
        # the management admin key (fail closed: without the Secret, management is 403)
        admin = env["FLEET_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
        assert admin == {"name": "fleet-admin", "key": "FLEET_ADMIN_KEY", "optional": True}
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(annotations["prometheus.io/port"])
        assert group["rayStartParams"]["metrics-export-port"] == str(ports["metrics"])
    head_ports = {
        p["name"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert {"dashboard", "gcs-server", "serve"} <= head_ports
    assert cluster["authOptions"] == {"mode": "token"}
    monitor = yaml.safe_load((ROOT / "ops" / "kuberay" / "podmonitor.yaml").read_text())
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_dockerfile_pins_the_manifests_ray_and_a_cuda_torch(manifest: dict[str, Any]) -> None:
    text = DOCKERFILE.read_text()
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == RAY_VERSION
    assert re.search(rf"^ARG RAY_VERSION={re.escape(RAY_VERSION)}$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download.pytorch.org/whl/cu\d+$", text, re.M)
    assert "COPY deployments" in text
    assert "COPY serve_app" in text


def test_a_pools_config_gets_one_gpu_per_gpu_host_and_keeps_cpu_pools(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    args = config["applications"][0]["args"]
    args.pop("host")
    args["pools"] = [
        {"name": "tabular", "num_replicas": 2, "memory_budget": "1GiB", "accelerator": "cpu"},
        {
            "name": "text",
            "memory_budget": "2GiB",
            "autoscaling": {"min_replicas": 1, "max_replicas": 4},
        },
    ]
    serve = serve_config(config, KubeRayOptions())
    pools = {p["name"]: p for p in serve["applications"][0]["args"]["pools"]}
    assert pools["tabular"] == args["pools"][0]  # CPU pool untouched
    assert pools["text"]["accelerator"] == "cuda"
    assert "memory_budget" not in pools["text"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    rendered = yaml.safe_load(render_manifest(path))
    gpu = rendered["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    assert (gpu["replicas"], gpu["maxReplicas"]) == (1, 4)


def test_gcs_fault_tolerance_with_an_external_redis_is_valid_and_off_by_default(
    validator: jsonschema.Validator, manifest: dict[str, Any], tmp_path: Path
) -> None:
    assert "gcsFaultToleranceOptions" not in manifest["spec"]["rayClusterConfig"]
    out = tmp_path / "ha.yaml"
    args = ["--config", str(ROOT / "config.yaml"), "kuberay", "-o", str(out)]
    assert main([*args, "--gcs-redis-address", "redis.fleet.svc:6379"]) == 0
    ha = yaml.safe_load(out.read_text())
    assert _errors(validator, ha) == []
    options = ha["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == "redis.fleet.svc:6379"
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "fleet-redis"
