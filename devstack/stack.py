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

Ray token authentication (Ray 2.60):

- The token is read from `RAY_AUTH_TOKEN`, else from the file `RAY_AUTH_TOKEN_PATH`, else
  from `~/.ray/auth_token`. `up` creates that file (mode 0600) when no token exists; the
  token is never printed (`ray get-auth-token` shows it to a user who needs it).
- `RAY_AUTH_MODE=token` turns authentication on explicitly for `ray start` and for every
  client (`serve deploy`, `serve status`, `ray.init(address=...)`); clients send the token as
  `Authorization: Bearer <token>`. (Unset, `ray start` enables it only if a token already
  exists, and `ray.init` with an explicit address never does.)

Loopback only: Ray resolves `--node-ip-address=127.0.0.1` to the machine's routable address
unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which makes it keep 127.0.0.1 as node address;
with that, GCS, raylet, dashboard, agents and the client server all bind 127.0.0.1.

The Ray head runs as `ray start --head --block` in its own process group: SIGTERM to that one
process drains the node and stops every Ray process it started (and nothing else), unlike
`ray stop`, which kills every Ray process of the machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from devstack import ray_env
from devstack.process import (
    HOST,
    ManagedProcess,
    find_free_port,
    port_is_open,
    write_private_file,
)
from devstack.prometheus import (
    PrometheusError,
    PrometheusServer,
    default_rule_files,
    prometheus_binary,
)
from devstack.seaweed import SeaweedError, SeaweedServer
from serve_app.errors import FleetError

logger = logging.getLogger(__name__)

APP_NAME = "fleet"
STATE_FILE = "stack.json"
STATE_VERSION = 1
S3_PORT = 8333
GCS_PORT = 6379
DASHBOARD_PORT = 8265
DASHBOARD_URL = f"http://{HOST}:{DASHBOARD_PORT}"
# Ray's per-node metrics endpoint (`ray start --metrics-export-port`), scraped by Prometheus.
METRICS_EXPORT_PORT = 8080
PROMETHEUS_PORT = 9090
DEFAULT_SERVE_URL = f"http://{HOST}:8000"
SAMPLE_MODEL = "minilm-embed"
SAMPLE_INPUTS: list[str] = ["hello world"]

S3_READY_TIMEOUT_S = 60.0
RAY_READY_TIMEOUT_S = 120.0
APP_READY_TIMEOUT_S = 300.0
DEPLOY_TIMEOUT_S = 180.0
PROMETHEUS_READY_TIMEOUT_S = 60.0
RAY_STOP_TIMEOUT_S = 60.0
_POLL_S = 0.5

# Variables that make Ray keep 127.0.0.1 as the node address (see the module docstring).
RAY_LOOPBACK_ENV = ray_env.LOOPBACK_ENV
RAY_AUTH_ENV = ray_env.AUTH_ENV


AGENT_PORT = 52365  # Ray's default dashboard agent port (job submission goes through it)
CLIENT_SERVER_PORT = 10001  # Ray's default Ray Client port


def _default_or_free(port: int) -> int:
    return port if not port_is_open(port) else find_free_port()


class StackError(FleetError):
    """The local stack could not be brought up or down; the message says what to do."""

    code = "local_stack_error"


def _say(message: str) -> None:
    """A progress line for the person at the terminal (stderr, so stdout stays clean)."""
    print(f"==> {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- state file
def state_path(state_dir: Path) -> Path:
    """`<state_dir>/stack.json`."""
    return Path(state_dir) / STATE_FILE


def load_state(state_dir: Path) -> dict[str, Any]:
    """The recorded stack state, or an empty dict when there is none."""
    path = state_path(state_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}); remove it and run up again") from exc
    if not isinstance(data, dict):
        raise StackError(f"{path} does not hold a JSON object; remove it and run up again")
    return data


def save_state(state_dir: Path, state: Mapping[str, Any]) -> None:
    """Write the stack state atomically with mode 0600 (it holds the local S3 secret key)."""
    write_private_file(state_path(state_dir), json.dumps({**state, "version": STATE_VERSION}))


def load_stack_env(state_dir: Path) -> dict[str, str]:
    """The AWS_* variables of the running local S3 server of the stack in `state_dir`.

    Other CLI commands use it to default to the local stack when AWS_ENDPOINT_URL is unset.

    Returns:
        AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION, or an
        empty dict when no stack is recorded there or its S3 server is not running.
    """
    try:
        s3_state = load_state(state_dir).get("s3")
    except StackError:
        return {}
    if not s3_state or not s3_state.get("pid"):
        return {}
    server = SeaweedServer.from_state(s3_state)
    if not server.is_running():
        return {}
    return server.env()


# --------------------------------------------------------------------------- ray auth
def ray_auth_token_path() -> Path:
    """Where Ray reads its token file: `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`."""
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def ensure_ray_auth_token() -> Path | None:
    """Make sure Ray has a token: create the token file (mode 0600) if there is none.

    Returns:
        The token file, or None when the token comes from the `RAY_AUTH_TOKEN` variable.
    """
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return None
    path = ray_auth_token_path()
    with contextlib.suppress(FileNotFoundError):
        if path.read_text().strip():
            return path
    import secrets

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_file(path, secrets.token_hex(32))  # same form as `ray get-auth-token`
    _say(f"created a Ray auth token in {path} (show it with `ray get-auth-token`)")
    return path


def _ray_token() -> str:
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    try:
        token = ray_auth_token_path().read_text().strip()
    except FileNotFoundError:
        token = ""
    if not token:
        raise StackError("no Ray auth token found; run `fleetserve up` to create one")
    return token


def ray_auth_headers() -> dict[str, str]:
    """HTTP headers that authenticate to the Ray dashboard (holds the token: never log)."""
    return {"Authorization": f"Bearer {_ray_token()}"}


def ray_cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Ray/Serve CLI calls against the local cluster (token auth on)."""
    return {**os.environ, **RAY_AUTH_ENV, **RAY_LOOPBACK_ENV, **(extra or {})}


def _venv_tool(name: str) -> str:
    """A console script next to this interpreter (the venv's `ray`, `serve`), else the name."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _with_aws_env(base: Mapping[str, str], aws_env: Mapping[str, str]) -> dict[str, str]:
    """`base` with every AWS_* variable replaced by `aws_env` (no stray profile or token)."""
    env = {k: v for k, v in base.items() if not k.startswith("AWS_")}
    env.update(aws_env)
    return env


# --------------------------------------------------------------------------- ray head
class RayHead(ManagedProcess):
    """A Ray head node on 127.0.0.1 with the dashboard, run as `ray start --head --block`.

    Args:
        log_path: Where `ray start` writes its output (appended).
        env: The environment of the head; workers (Serve replicas) inherit it.
        gcs_port: The GCS port (`ray start --port`).
        dashboard_port: The dashboard port.
        metrics_export_port: The port of the node's Prometheus metrics endpoint.
    """

    error = StackError
    # SIGTERM to `ray start --block` alone: it drains the node and stops its Ray processes.
    signal_group_first = False
    leftover_grace_s = 15.0  # workers exit by themselves once the raylet is gone

    def __init__(
        self,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        gcs_port: int = GCS_PORT,
        dashboard_port: int = DASHBOARD_PORT,
        metrics_export_port: int = METRICS_EXPORT_PORT,
    ) -> None:
        super().__init__(log_path)
        self.env = dict(env) if env is not None else dict(os.environ)
        self.gcs_port = gcs_port
        self.dashboard_port = dashboard_port
        self.metrics_export_port = metrics_export_port
        # NOTE: Ray's defaults for these are fixed ports; another Ray instance on the machine
        # (a test session, a notebook's ray.init) may hold them, which would leave this head
        # without a job agent. Keep the defaults when free, else take free ones (at start).
        self.agent_port = AGENT_PORT
        self.client_server_port = CLIENT_SERVER_PORT

    @property
    def dashboard_url(self) -> str:
        """`http://127.0.0.1:<dashboard port>`."""
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """`127.0.0.1:<gcs port>`, the address for `ray.init(address=...)`."""
        return f"{HOST}:{self.gcs_port}"

    def command(self) -> list[str]:
        """The `ray start` command line."""
        return [
            _venv_tool("ray"),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={HOST}",
            f"--port={self.gcs_port}",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            f"--metrics-export-port={self.metrics_export_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--ray-client-server-port={self.client_server_port}",
            "--disable-usage-stats",
        ]

    def start(self) -> None:
        """Launch the head in its own session (returns at once; see `wait_ready`)."""
        for port in (self.gcs_port, self.dashboard_port, self.metrics_export_port):
            if port_is_open(port):
                raise StackError(
                    f"port {port} on {HOST} is in use: a Ray cluster fleetserve did not start "
                    "(or another program) is running; stop it (e.g. `ray stop`) and retry"
                )
        self.agent_port = _default_or_free(AGENT_PORT)
        self.client_server_port = _default_or_free(CLIENT_SERVER_PORT)
        # NOTE: job entrypoints (`ray job submit -- python job.py`) run with the head's PATH:
        # put this environment's bin first so their `python` has Ray and fleetserve.
        path = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        env = {**self.env, **RAY_AUTH_ENV, **RAY_LOOPBACK_ENV, "PATH": path}
        self._spawn(self.command(), env=env)
        logger.info("ray head started", extra={"pid": self.pid, "log_path": str(self.log_path)})

    def node_alive(self) -> bool:
        """Whether the dashboard answers (authenticated) and reports an alive node."""
        try:
            resp = httpx.get(
                f"{self.dashboard_url}/api/v0/nodes",
                params={"limit": 10},
                headers=ray_auth_headers(),
                timeout=5.0,
            )
        except httpx.HTTPError:
            return False
        if resp.status_code != 200:
            return False
        try:
            nodes = resp.json()["data"]["result"]["result"]
        except (ValueError, KeyError, TypeError):
            return False
        return any(node.get("state") == "ALIVE" for node in nodes)

    def wait_ready(self, timeout_s: float = RAY_READY_TIMEOUT_S) -> float:
        """Poll until the head's node is alive behind the dashboard; returns seconds waited."""
        started = time.monotonic()
        deadline = started + timeout_s
        while not self.node_alive():
            if not self.is_running():
                raise StackError(f"`ray start` exited; see {self.log_path}\n{self.log_tail(3000)}")
            if time.monotonic() >= deadline:
                raise StackError(f"Ray head not ready after {timeout_s:.0f}s; see {self.log_path}")
            time.sleep(_POLL_S)
        return time.monotonic() - started

    def stop(self, timeout_s: float = RAY_STOP_TIMEOUT_S) -> bool:
        """SIGTERM the `ray start --block` process (it drains the node and stops the Ray
        processes it started), then SIGKILL its process group if anything is left.

        Returns:
            True when a running head was stopped.
        """
        return super().stop(timeout_s)

    def state(self) -> dict[str, Any]:
        """What `down` needs to find and stop this head."""
        return {
            **self._process_state(),
            "gcs_port": self.gcs_port,
            "dashboard_port": self.dashboard_port,
            "metrics_export_port": self.metrics_export_port,
            "log_path": str(self.log_path),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RayHead:
        """Adopt a head recorded by `state()` (only signalled while it is the same process)."""
        head = cls(
            Path(state["log_path"]),
            gcs_port=int(state.get("gcs_port", GCS_PORT)),
            dashboard_port=int(state.get("dashboard_port", DASHBOARD_PORT)),
            metrics_export_port=int(state.get("metrics_export_port", METRICS_EXPORT_PORT)),
        )
        head._adopt(state)
        return head


# --------------------------------------------------------------------------- serve
def serve_deploy(
    config_path: Path, dashboard_url: str = DASHBOARD_URL, timeout_s: float = DEPLOY_TIMEOUT_S
) -> None:
    """Run the real `serve deploy <config> -a <dashboard>` with token auth."""
    _run_cli(
        [_venv_tool("serve"), "deploy", str(config_path), "-a", dashboard_url],
        what="serve deploy",
        timeout_s=timeout_s,
    )


def serve_shutdown(dashboard_url: str = DASHBOARD_URL, timeout_s: float = 120.0) -> None:
    """Run `serve shutdown -y -a <dashboard>` with token auth."""
    _run_cli(
        [_venv_tool("serve"), "shutdown", "-y", "-a", dashboard_url],
        what="serve shutdown",
        timeout_s=timeout_s,
    )


def _run_cli(cmd: list[str], *, what: str, timeout_s: float) -> None:
    try:
        result = subprocess.run(
            cmd,
            env=ray_cli_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"`{what}` did not finish in {timeout_s:.0f}s") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout or "").strip()[-3000:]
        raise StackError(f"`{what}` failed (exit {result.returncode}):\n{tail}")


def serve_app_status(app_name: str = APP_NAME, dashboard_url: str = DASHBOARD_URL) -> dict:
    """The Serve REST API's view of one application (`{}` when it is not deployed)."""
    resp = httpx.get(
        f"{dashboard_url}/api/serve/applications/", headers=ray_auth_headers(), timeout=10.0
    )
    resp.raise_for_status()
    return (resp.json().get("applications") or {}).get(app_name) or {}


def wait_app_running(
    serve_url: str,
    app_name: str = APP_NAME,
    dashboard_url: str = DASHBOARD_URL,
    timeout_s: float = APP_READY_TIMEOUT_S,
) -> float:
    """Poll until `app_name` is RUNNING and `GET <serve_url>/healthz` answers 200.

    Returns:
        Seconds waited.

    Raises:
        StackError: the deploy failed or the deadline passed.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    last_status = ""
    while True:
        try:
            app = serve_app_status(app_name, dashboard_url)
        except httpx.HTTPError as exc:
            app = {"status": f"dashboard not answering ({type(exc).__name__})"}
        status = str(app.get("status") or "NOT_DEPLOYED")
        if status != last_status:
            _say(f"app {app_name!r}: {status}")
            last_status = status
        if status == "DEPLOY_FAILED":
            raise StackError(
                f"deploying {app_name!r} failed: {app.get('message') or 'no message'}\n"
                f"(details: `serve status` or the dashboard at {dashboard_url})"
            )
        if status == "RUNNING" and _healthz_ok(serve_url):
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            raise StackError(
                f"{app_name!r} not serving after {timeout_s:.0f}s (status {status}); "
                f"see `serve status` and the dashboard at {dashboard_url}"
            )
        time.sleep(_POLL_S)


def _healthz_ok(serve_url: str) -> bool:
    try:
        return httpx.get(f"{serve_url}/healthz", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


def serve_http_url(config_path: Path) -> str:
    """The HTTP address the Serve config asks for (`http_options`), default 127.0.0.1:8000."""
    try:
        data = yaml.safe_load(Path(config_path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return DEFAULT_SERVE_URL
    options = data.get("http_options") or {}
    host = str(options.get("host") or HOST)
    if host in ("0.0.0.0", "::", ""):
        host = HOST
    return f"http://{host}:{int(options.get('port') or 8000)}"


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
    _say(f"{name} already running at {server.endpoint_url}")
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
    _say(f"starting S3 (SeaweedFS) at {server.endpoint_url}, data in {server.data_dir}")
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
    _say(f"S3 ready in {waited:.1f}s")
    return server


def _ensure_ray(state_dir: Path, state: dict[str, Any], aws_env: Mapping[str, str]) -> RayHead:
    """Find our recorded Ray head running, or start one with the S3 variables in its env."""
    recorded = state.get("ray") or {}
    if recorded.get("pid"):
        head = RayHead.from_state(recorded)
        if head.is_running():
            head.wait_ready(timeout_s=RAY_READY_TIMEOUT_S)
            if recorded.get("s3_endpoint_url") != aws_env.get("AWS_ENDPOINT_URL"):
                _say(
                    "warning: the running Ray head was started for another S3 endpoint; "
                    "run `fleetserve down` then `fleetserve up` to restart it"
                )
            _say(f"Ray head already running (dashboard {head.dashboard_url})")
            return head
    env = _with_aws_env(os.environ, aws_env)
    # Workers import serve_app/deployments: make the checkout importable even when the
    # package is not installed into the environment.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_project_root()), env.get("PYTHONPATH", "")) if p
    )
    head = RayHead(state_dir / "logs" / "ray-head.log", env=env)
    _say(f"starting Ray head (dashboard {head.dashboard_url}, GCS {head.gcs_address})")
    started = time.monotonic()
    head.start()
    state["ray"] = {
        **head.state(),
        "started_by_us": True,
        "s3_endpoint_url": aws_env.get("AWS_ENDPOINT_URL"),
    }
    save_state(state_dir, state)
    try:
        head.wait_ready()
    except StackError:
        head.stop()
        state.pop("ray", None)
        save_state(state_dir, state)
        raise
    _say(f"Ray head ready in {time.monotonic() - started:.1f}s")
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
    _say(f"starting Prometheus at {server.endpoint_url} (scraping Ray metrics at {target})")
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
    _say(f"Prometheus ready in {waited:.1f}s")
    return server


def _running_prometheus(state: Mapping[str, Any]) -> PrometheusServer | None:
    """The Prometheus an earlier `up --prometheus` started, while it still runs."""
    recorded = state.get("prometheus") or {}
    if not recorded.get("pid"):
        return None
    server = PrometheusServer.from_state(recorded)
    return server if server.is_running() else None


def _publish_demo(config_path: Path, demo_count: int) -> None:
    """Publish the demo fleet into the configured store (existing versions are skipped)."""
    if demo_count <= 0:
        _say("demo fleet: skipped (count 0)")
        return
    from devstack.demo_fleet import publish_demo_fleet
    from serve_app.config import load_config
    from serve_app.storage.store import ModelStore

    store = ModelStore(load_config(config_path).store)
    _say(f"demo fleet: making sure {demo_count} models are published in {store.config.url}")
    published = publish_demo_fleet(store, demo_count, progress=True)
    _say(f"demo fleet ready ({len(published)} model versions newly published)")


def _shorten(value: Any, max_items: int = 4, max_str: int = 80) -> Any:
    """A JSON value cut down for display: long lists and strings are elided."""
    if isinstance(value, list):
        head = [_shorten(v, max_items, max_str) for v in value[:max_items]]
        if len(value) > max_items:
            head.append(f"... {len(value) - max_items} more")
        return head
    if isinstance(value, dict):
        return {k: _shorten(v, max_items, max_str) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, str) and len(value) > max_str:
        return value[:max_str] + "..."
    return value


def _sample_request(serve_url: str) -> str:
    """POST one predict call to the demo model; the shortened answer (or the error)."""
    url = f"{serve_url}/v1/models/{SAMPLE_MODEL}/predict"
    try:
        resp = httpx.post(url, json={"inputs": SAMPLE_INPUTS}, timeout=120.0)
    except httpx.HTTPError as exc:
        return f"(request failed: {type(exc).__name__})"
    try:
        body: Any = _shorten(resp.json())
    except ValueError:
        body = resp.text[:300]
    return f"HTTP {resp.status_code} {json.dumps(body)}"


def _print_summary(
    serve_url: str,
    s3: SeaweedServer,
    state_dir: Path,
    sample: str,
    prometheus_url: str | None = None,
) -> None:
    body = json.dumps({"inputs": SAMPLE_INPUTS})
    lines = [
        "",
        "fleetserve is up (everything on 127.0.0.1):",
        f"  API            {serve_url}",
        f"  OpenAPI docs   {serve_url}/docs",
        f"  Ray dashboard  {DASHBOARD_URL}   (token: `ray get-auth-token`)",
        f"  S3 endpoint    {s3.endpoint_url}   (keys in {state_path(state_dir)})",
    ]
    if prometheus_url:
        lines.append(f"  Prometheus     {prometheus_url}   (queries: ops/prometheus/queries.md)")
    lines += [
        "",
        "Try it:",
        f"  curl -s -X POST {serve_url}/v1/models/{SAMPLE_MODEL}/predict \\",
        f"       -H 'content-type: application/json' -d '{body}'",
        f"  -> {sample}",
        "",
        "Stop everything with: fleetserve down",
    ]
    print("\n".join(lines), flush=True)


def up(config_path: Path, state_dir: Path, demo_count: int, prometheus: bool) -> None:
    """Bring up the local stack (idempotent): S3, Ray head, demo fleet, Serve app `fleet`.

    Args:
        config_path: The Serve config to deploy (`serve deploy`).
        state_dir: Where data, logs and `stack.json` live.
        demo_count: How many demo models to make sure are published (0: none).
        prometheus: Also start (or find running) Prometheus on 127.0.0.1:9090, scraping the
            Ray head's metrics endpoint (127.0.0.1:8080) with the fleet alert rules.

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
    _say(f"drivers in this environment reach the loopback cluster ({hook.name})")
    if "metrics_export_port" not in (state.get("ray") or {}):
        _say(
            "warning: the running Ray head predates its fixed metrics port; Prometheus may "
            "not find its metrics until `fleetserve down` and `fleetserve up`"
        )
    prom = _ensure_prometheus(state_dir, state, head) if prometheus else None
    if prom is None and (prom := _running_prometheus(state)) is not None:
        _say(f"Prometheus (started by an earlier `up --prometheus`) runs at {prom.endpoint_url}")

    _publish_demo(config_path, demo_count)

    serve_url = serve_http_url(config_path)
    _say(f"deploying {config_path.name} (serve deploy -a {DASHBOARD_URL})")
    serve_deploy(config_path)
    state["serve"] = {"config_path": str(config_path), "url": serve_url, "app": APP_NAME}
    save_state(state_dir, state)
    waited = wait_app_running(serve_url)
    _say(f"app {APP_NAME!r} serving after {waited:.1f}s")

    _print_summary(
        serve_url,
        s3,
        state_dir,
        _sample_request(serve_url),
        prom.endpoint_url if prom is not None else None,
    )


def down(state_dir: Path) -> None:
    """Stop what `up` started (Prometheus, Serve app, Ray head, S3), by recorded process id.

    Data, logs and the S3 keys stay in `state_dir`, so a later `up` finds the same models.
    """
    state_dir = Path(state_dir).resolve()
    state = load_state(state_dir)
    if not state:
        _say(f"no stack recorded in {state_dir}; nothing to stop")
        return

    prom_state = state.get("prometheus") or {}
    if prom_state.get("pid") and prom_state.get("started_by_us"):
        server = PrometheusServer.from_state(prom_state)
        if server.is_running():
            _say(f"stopping Prometheus (pid {server.pid})")
            server.stop()
            _say("Prometheus stopped")
        else:
            _say("Prometheus: not running")
        # Its data folder (the TSDB) stays: the next `up --prometheus` keeps the history.
        state.pop("prometheus", None)
        save_state(state_dir, state)

    ray_state = state.get("ray") or {}
    if ray_state.get("pid") and ray_state.get("started_by_us"):
        head = RayHead.from_state(ray_state)
        if head.is_running():
            _say("shutting down Serve applications (serve shutdown)")
            try:
                serve_shutdown(head.dashboard_url)
            except StackError as exc:
                _say(f"warning: {exc}; stopping Ray anyway")
            _say(f"stopping Ray head (pid {head.pid})")
            head.stop()
            _forget_ray_address(head.gcs_address)
            ray_env.uninstall_hook()
            _say("Ray head stopped")
        else:
            _say("Ray head: not running")
        state.pop("ray", None)
        state.pop("serve", None)
        save_state(state_dir, state)

    s3_state = state.get("s3") or {}
    if s3_state.get("pid") and s3_state.get("started_by_us"):
        server = SeaweedServer.from_state(s3_state)
        if server.is_running():
            _say(f"stopping S3 (SeaweedFS, pid {server.pid})")
            server.stop()
            _say("S3 stopped")
        else:
            _say("S3 (SeaweedFS): not running")
        # Keep keys, ports and data dir: the next `up` reuses them.
        state["s3"] = {**s3_state, "pid": None, "fingerprint": None}
        save_state(state_dir, state)
    _say("local stack is down")


def _forget_ray_address(gcs_address: str) -> None:
    """Remove Ray's "current cluster" file if it still names our stopped head.

    `ray start` writes it (in Ray's temp dir) so that `ray.init(address="auto")` finds the
    cluster; `ray stop` removes it, a SIGTERM-ed `ray start --block` does not.
    """
    temp_root = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    path = Path(temp_root) / "ray" / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if path.read_text().strip() == gcs_address:
            path.unlink()
