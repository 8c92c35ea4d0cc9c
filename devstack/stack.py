"""The local stack behind `fleetserve up` / `fleetserve down`: S3, Ray, Serve on 127.0.0.1.

`up` starts (or finds running) a SeaweedFS S3 server and a Ray head with the dashboard,
publishes the demo fleet, deploys the Serve config with the real `serve deploy` CLI, waits
until the `fleet` app answers, and prints where everything is. `down` stops exactly what `up`
started, by the process ids it recorded in `<state_dir>/stack.json` (mode 0600: it holds the
local S3 keys, which are generated once and reused on every later `up`).

`up --prometheus` also runs Prometheus (`devstack.prometheus`, Debian's binary) on
127.0.0.1:9090, scraping the Ray head's metrics endpoint (`--metrics-export-port`,
127.0.0.1:8080) every 2 s with the rules in `ops/prometheus/fleet-rules.yml`; its TSDB lives
in `<state_dir>/prometheus` and survives `down`.

The pieces live beside this module: the state file, `StackError` and progress lines in
`devstack.state`, the Ray head and Ray auth in `devstack.ray_head`, `serve deploy` and the
wait for the app in `devstack.serve_cli`, and the servers in `devstack.seaweed` and
`devstack.prometheus`. This module is the orchestration: what `up` starts or adopts, in
which order, and what `down` stops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from devstack import credentials, ray_env
from devstack.ports import HOST, port_is_open
from devstack.prometheus import (
    PrometheusError,
    PrometheusServer,
    default_rule_files,
    prometheus_binary,
)
from devstack.ray_head import (
    DASHBOARD_URL,
    RAY_READY_TIMEOUT_S,
    RayHead,
    ensure_ray_auth_token,
    forget_ray_address,
)
from devstack.seaweed import SeaweedError, SeaweedServer
from devstack.serve_cli import (
    APP_NAME,
    serve_deploy,
    serve_http_url,
    serve_shutdown,
    wait_app_running,
)
from devstack.state import StackError, load_state, save_state, say
from devstack.summary import print_summary, sample_request
from devstack.vision_models import VISION_COUNT
from devstack.workers import ensure_workers, node_env, stop_workers
from serve_app.errors import FleetError

S3_PORT = 8333
PROMETHEUS_PORT = 9090

S3_READY_TIMEOUT_S = PROMETHEUS_READY_TIMEOUT_S = 60.0


def _project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _with_aws_env(base: Mapping[str, str], aws_env: Mapping[str, str]) -> dict[str, str]:
    """`base` with every AWS_* variable replaced by `aws_env` (no stray profile or token)."""
    env = {k: v for k, v in base.items() if not k.startswith("AWS_")}
    env.update(aws_env)
    return env


# --------------------------------------------------------------------------- up / down
_Server = TypeVar("_Server", SeaweedServer, PrometheusServer)


def _adopt_running(
    cls: type[_Server], recorded: dict[str, Any], timeout_s: float, name: str, retry: str
) -> _Server | None:
    """The server `up` recorded earlier, if it still runs and answers; None if it is gone.

    Raises:
        StackError: it runs but does not answer.
    """
    if not recorded.get("pid"):
        return None
    server = cls.from_state(recorded)
    if not server.is_running():
        return None
    try:
        server.wait_ready(timeout_s=timeout_s)
    except FleetError as exc:
        raise StackError(
            f"the recorded {name} (pid {server.pid}) runs but does not answer: {exc}; "
            f"run `fleetserve down` and `{retry}` again"
        ) from exc
    say(f"{name} already running at {server.endpoint_url}")
    return server


def _ensure_s3(state_dir: Path, state: dict[str, Any]) -> SeaweedServer:
    """Find the recorded S3 server running, or start one with the saved (or new) keys."""
    recorded = state.get("s3") or {}
    running = _adopt_running(
        SeaweedServer, recorded, S3_READY_TIMEOUT_S, "S3 (SeaweedFS)", "fleetserve up"
    )
    if running is not None:
        return running
    if port_is_open(S3_PORT):
        raise StackError(
            f"port {S3_PORT} on {HOST} is in use by a program fleetserve did not start; "
            "stop it and run `fleetserve up` again"
        )
    server = SeaweedServer(
        state_dir / "s3",
        s3_port=S3_PORT,
        access_key=recorded.get("access_key"),
        secret_key=recorded.get("secret_key"),
        log_path=state_dir / "logs" / "seaweedfs.log",
    )
    say(f"starting S3 (SeaweedFS) at {server.endpoint_url}, data in {server.data_dir}")
    server.start()
    state["s3"] = {**server.state(), "started_by_us": True}
    save_state(state_dir, state)
    try:
        waited = server.wait_ready(timeout_s=S3_READY_TIMEOUT_S)
    except SeaweedError as exc:
        server.stop()
        state["s3"] = {**state["s3"], "pid": None, "fingerprint": None}
        save_state(state_dir, state)
        raise StackError(str(exc)) from exc
    say(f"S3 ready in {waited:.1f}s")
    return server


def _ensure_ray(state_dir: Path, state: dict[str, Any], aws_env: Mapping[str, str]) -> RayHead:
    """Find our recorded Ray head running, or start one with the S3 variables and the
    admin key (FLEET_ADMIN_KEY) in its env."""
    recorded = state.get("ray") or {}
    if recorded.get("pid"):
        head = RayHead.from_state(recorded)
        if head.is_running():
            head.wait_ready(timeout_s=RAY_READY_TIMEOUT_S)
            if recorded.get("s3_endpoint_url") != aws_env.get("AWS_ENDPOINT_URL"):
                say(
                    "warning: the running Ray head was started for another S3 endpoint; "
                    "run `fleetserve down` then `fleetserve up` to restart it"
                )
            if not recorded.get("admin_key"):
                say(
                    "warning: the running Ray head predates the admin key; management "
                    "answers 403 until `fleetserve down` and `fleetserve up`"
                )
            say(f"Ray head already running (dashboard {head.dashboard_url})")
            return head
    env = _with_aws_env(os.environ, aws_env)
    env["FLEET_ADMIN_KEY"] = credentials.ensure_admin_key(state_dir)
    # Workers import serve_app/deployments: make the checkout importable even when the
    # package is not installed into the environment.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_project_root()), env.get("PYTHONPATH", "")) if p
    )
    head = RayHead(state_dir / "logs" / "ray-head.log", env=env)
    say(f"starting Ray head (dashboard {head.dashboard_url}, GCS {head.gcs_address})")
    started = time.monotonic()
    head.start()
    state["ray"] = {
        **head.state(),
        "started_by_us": True,
        "s3_endpoint_url": aws_env.get("AWS_ENDPOINT_URL"),
        "admin_key": True,  # NOTE: only whether it has one; the key is in <state_dir>/admin_key
    }
    save_state(state_dir, state)
    try:
        head.wait_ready()
    except StackError:
        head.stop()
        state.pop("ray", None)
        save_state(state_dir, state)
        raise
    say(f"Ray head ready in {time.monotonic() - started:.1f}s")
    return head


def _ensure_prometheus(state_dir: Path, state: dict[str, Any], head: RayHead) -> PrometheusServer:
    """Find our recorded Prometheus running, or start one on 127.0.0.1:9090 that scrapes the
    Ray head's metrics endpoint every 2 s and evaluates `ops/prometheus/fleet-rules.yml`."""
    recorded = state.get("prometheus") or {}
    running = _adopt_running(
        PrometheusServer,
        recorded,
        PROMETHEUS_READY_TIMEOUT_S,
        "Prometheus",
        "fleetserve up --prometheus",
    )
    if running is not None:
        return running
    if port_is_open(PROMETHEUS_PORT):
        raise StackError(
            f"port {PROMETHEUS_PORT} on {HOST} is in use by a program fleetserve did not start "
            "(a system Prometheus service?); stop it and run `fleetserve up --prometheus` again"
        )
    target = f"{HOST}:{head.metrics_export_port}"
    server = PrometheusServer(
        state_dir / "prometheus",
        port=PROMETHEUS_PORT,
        scrape_targets=[target],
        rule_files=default_rule_files(),
        log_path=state_dir / "logs" / "prometheus.log",
    )
    say(f"starting Prometheus at {server.endpoint_url} (scraping Ray metrics at {target})")
    try:
        server.start()
    except PrometheusError as exc:
        raise StackError(str(exc)) from exc
    state["prometheus"] = {**server.state(), "started_by_us": True}
    save_state(state_dir, state)
    try:
        waited = server.wait_ready(timeout_s=PROMETHEUS_READY_TIMEOUT_S)
    except PrometheusError as exc:
        server.stop()
        state.pop("prometheus", None)
        save_state(state_dir, state)
        raise StackError(str(exc)) from exc
    say(f"Prometheus ready in {waited:.1f}s")
    return server


def _running_prometheus(state: Mapping[str, Any]) -> PrometheusServer | None:
    """The Prometheus an earlier `up --prometheus` started, while it still runs."""
    recorded = state.get("prometheus") or {}
    if not recorded.get("pid"):
        return None
    server = PrometheusServer.from_state(recorded)
    return server if server.is_running() else None


def _publish_demo(config_path: Path, demo_count: int, vision: int) -> None:
    """Publish the demo fleet (`vision` image classifiers among it) into the configured
    store (existing versions are skipped)."""
    if demo_count <= 0:
        say("demo fleet: skipped (count 0)")
        return
    from devstack.demo_fleet import publish_demo_fleet
    from serve_app.config import load_config
    from serve_app.storage.store import ModelStore

    store = ModelStore(load_config(config_path).store)
    say(f"demo fleet: making sure {demo_count} models are published in {store.config.url}")
    published = publish_demo_fleet(store, demo_count, progress=True, vision=vision)
    say(f"demo fleet ready ({len(published)} model versions newly published)")


def up(
    config_path: Path,
    state_dir: Path,
    demo_count: int,
    prometheus: bool,
    vision: int = VISION_COUNT,
    tenants: bool = False,
    workers: int | None = None,
    worker_cpus: float = 2.0,
) -> None:
    """Bring up the local stack (idempotent): S3, Ray head, demo fleet, Serve app `fleet`.

    Args:
        config_path: The Serve config to deploy (`serve deploy`).
        state_dir: Where data, logs and `stack.json` live.
        demo_count: How many demo models to make sure are published (0: none).
        prometheus: Also start (or find running) Prometheus on 127.0.0.1:9090, scraping the
            Ray head's metrics endpoint (127.0.0.1:8080) with the fleet alert rules.
        vision: How many demo image classifiers to publish with them.
        tenants: Deploy with two demo tenants (keys generated into `state_dir`, printed).
        workers: Ray worker nodes to run beside the head (`devstack.workers`): exactly this
            many; None keeps whatever an earlier `up` started.
        worker_cpus: CPUs each new worker node offers to Ray.

    Raises:
        StackError: a step failed; the message says which and what to do.
    """
    config_path = Path(config_path).resolve()
    state_dir = Path(state_dir).resolve()
    if not config_path.is_file():
        raise StackError(f"Serve config {config_path} not found")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if prometheus:
        try:
            prometheus_binary()  # fail before starting anything when it is not installed
        except PrometheusError as exc:
            raise StackError(str(exc)) from exc
    state = load_state(state_dir)

    s3 = _ensure_s3(state_dir, state)
    aws_env = s3.env()
    # This process publishes the demo fleet: point it (and only it) at the local S3.
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[key]
    os.environ.update(aws_env)

    ensure_ray_auth_token()
    head = _ensure_ray(state_dir, state, aws_env)
    hook = ray_env.install_hook()
    say(f"drivers in this environment reach the loopback cluster ({hook.name})")
    if workers is not None:
        # NOTE: replicas on a worker node read the admin key from its raylet's env, as on
        # the head: an Ingress placed there must guard management with the same key.
        env = {**node_env(aws_env), "FLEET_ADMIN_KEY": credentials.ensure_admin_key(state_dir)}
        ensure_workers(state_dir, state, workers, head.gcs_address, env, worker_cpus)
    if "metrics_export_port" not in (state.get("ray") or {}):
        say(
            "warning: the running Ray head predates its fixed metrics port; Prometheus may "
            "not find its metrics until `fleetserve down` and `fleetserve up`"
        )
    prom = _ensure_prometheus(state_dir, state, head) if prometheus else None
    if prom is None and (prom := _running_prometheus(state)) is not None:
        say(f"Prometheus (started by an earlier `up --prometheus`) runs at {prom.endpoint_url}")

    _publish_demo(config_path, demo_count, vision)

    serve_url = serve_http_url(config_path)
    keys = credentials.ensure_demo_tenants(state_dir) if tenants else {}
    deployed = (
        credentials.write_tenant_config(config_path, state_dir, keys) if tenants else config_path
    )
    say(f"deploying {deployed.name} (serve deploy -a {DASHBOARD_URL})")
    serve_deploy(deployed)
    state["serve"] = {"config_path": str(config_path), "url": serve_url, "app": APP_NAME}
    save_state(state_dir, state)
    waited = wait_app_running(serve_url)
    say(f"app {APP_NAME!r} serving after {waited:.1f}s")

    sample_key = keys.get("text-team")
    print_summary(
        serve_url,
        s3,
        state_dir,
        sample_request(serve_url, sample_key),
        prom.endpoint_url if prom is not None else None,
    )
    if keys:
        print("\n".join(credentials.tenant_summary(serve_url, keys, state_dir)), flush=True)


def down(state_dir: Path) -> None:
    """Stop what `up` started (Prometheus, Serve app, Ray head, S3), by recorded process id.

    Data, logs and the S3 keys stay in `state_dir`, so a later `up` finds the same models.
    """
    state_dir = Path(state_dir).resolve()
    state = load_state(state_dir)
    if not state:
        say(f"no stack recorded in {state_dir}; nothing to stop")
        return

    prom_state = state.get("prometheus") or {}
    if prom_state.get("pid") and prom_state.get("started_by_us"):
        server = PrometheusServer.from_state(prom_state)
        if server.is_running():
            say(f"stopping Prometheus (pid {server.pid})")
            server.stop()
            say("Prometheus stopped")
        else:
            say("Prometheus: not running")
        # Its data folder (the TSDB) stays: the next `up --prometheus` keeps the history.
        state.pop("prometheus", None)
        save_state(state_dir, state)

    ray_state = state.get("ray") or {}
    if ray_state.get("pid") and ray_state.get("started_by_us"):
        head = RayHead.from_state(ray_state)
        if head.is_running():
            say("shutting down Serve applications (serve shutdown)")
            try:
                serve_shutdown(head.dashboard_url)
            except StackError as exc:
                say(f"warning: {exc}; stopping Ray anyway")
            stop_workers(state_dir, state)  # after Serve, before the head they joined
            say(f"stopping Ray head (pid {head.pid})")
            head.stop()
            forget_ray_address(head.gcs_address)
            ray_env.uninstall_hook()
            say("Ray head stopped")
        else:
            say("Ray head: not running")
        state.pop("ray", None)
        state.pop("serve", None)
        save_state(state_dir, state)
    stop_workers(state_dir, state)

    s3_state = state.get("s3") or {}
    if s3_state.get("pid") and s3_state.get("started_by_us"):
        server = SeaweedServer.from_state(s3_state)
        if server.is_running():
            say(f"stopping S3 (SeaweedFS, pid {server.pid})")
            server.stop()
            say("S3 stopped")
        else:
            say("S3 (SeaweedFS): not running")
        # Keep keys, ports and data dir: the next `up` reuses them.
        state["s3"] = {**s3_state, "pid": None, "fingerprint": None}
        save_state(state_dir, state)
    say("local stack is down")
