"""The local Ray head (`RayHead`) and what talks to it: its auth token and the environment
of Ray and Serve CLI calls against it.

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
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from devstack import ray_env
from devstack.ports import HOST, find_free_port, port_is_open
from devstack.process import ManagedProcess, write_private_file
from devstack.state import StackError, say

logger = logging.getLogger(__name__)

GCS_PORT = 6379
DASHBOARD_PORT = 8265
DASHBOARD_URL = f"http://{HOST}:{DASHBOARD_PORT}"
# Ray's per-node metrics endpoint (`ray start --metrics-export-port`), scraped by Prometheus.
METRICS_EXPORT_PORT = 8080
AGENT_PORT = 52365  # Ray's default dashboard agent port (job submission goes through it)
CLIENT_SERVER_PORT = 10001  # Ray's default Ray Client port

RAY_READY_TIMEOUT_S = 120.0
RAY_STOP_TIMEOUT_S = 60.0
_POLL_S = 0.5

# Variables that make Ray keep 127.0.0.1 as the node address (see the module docstring).
RAY_LOOPBACK_ENV = ray_env.LOOPBACK_ENV
RAY_AUTH_ENV = ray_env.AUTH_ENV


def _default_or_free(port: int) -> int:
    return port if not port_is_open(port) else find_free_port()


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
    say(f"created a Ray auth token in {path} (show it with `ray get-auth-token`)")
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


def venv_tool(name: str) -> str:
    """A console script next to this interpreter (the venv's `ray`, `serve`), else the name."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


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
            venv_tool("ray"),
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


def forget_ray_address(gcs_address: str) -> None:
    """Remove Ray's "current cluster" file if it still names our stopped head.

    `ray start` writes it (in Ray's temp dir) so that `ray.init(address="auto")` finds the
    cluster; `ray stop` removes it, a SIGTERM-ed `ray start --block` does not.
    """
    temp_root = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    path = Path(temp_root) / "ray" / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if path.read_text().strip() == gcs_address:
            path.unlink()
