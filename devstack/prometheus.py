"""A local Prometheus server (Debian's `prometheus` binary) as a managed child process.

`fleetserve up --prometheus` and the integration tests use it to scrape Ray's metrics
endpoints, where every fleetserve metric is exported with a `ray_` prefix (see
`serve_app.observability.metrics`), and to evaluate the alert and recording rules in
`ops/prometheus/fleet-rules.yml`. It listens on 127.0.0.1 only, keeps its TSDB under its data
folder and is stopped by its own process group (`devstack.process.ManagedProcess`).

Finding Ray's metrics endpoints: every Ray 2.60 head with a dashboard writes a Prometheus
file-based service-discovery file, `<session_dir>/prom_metrics_service_discovery.json`
(`[{"labels": {"job": "ray"}, "targets": ["<node ip>:<metrics export port>", ...]}]`, one
target per alive node plus the dashboard's and autoscaler's own metrics ports), rewritten every
5 s, so nodes that join later are found. `ray_service_discovery_file(session_dir)` names it;
pass it as `file_sd_files`. A static `scrape_targets` entry (`127.0.0.1:<metrics export
port>`, the port of `ray start --metrics-export-port`) is the fallback for a single node.

Typical use:

    with PrometheusServer(tmp / "prom", file_sd_files=[ray_service_discovery_file(sd)]) as prom:
        prom.query('sum by (model) (ray_fleet_requests_total)')
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from devstack.ports import HOST, find_free_port, port_is_open
from devstack.process import ManagedProcess, write_private_file
from serve_app.errors import FleetError

logger = logging.getLogger(__name__)

SCRAPE_INTERVAL_S = 2.0
SD_REFRESH_S = 5.0  # Ray rewrites its discovery file every 5 s
JOB_NAME = "ray"
CONFIG_NAME = "prometheus.yml"
LOG_NAME = "prometheus.log"
TSDB_DIR = "tsdb"
DEFAULT_RETENTION = "15d"
RAY_SD_FILE = "prom_metrics_service_discovery.json"
INSTALL_HINT = (
    "install Debian's prometheus package (it ships `prometheus` and `promtool`): "
    "`sudo apt-get update && sudo apt-get install -y --no-install-recommends prometheus`"
)
_POLL_S = 0.2


class PrometheusError(FleetError):
    """Prometheus could not be found, started, queried or stopped."""

    code = "prometheus_error"


# --------------------------------------------------------------------------- binaries
def _find_binary(name: str) -> str:
    found = shutil.which(name)
    if found is None and Path(f"/usr/bin/{name}").exists():
        found = f"/usr/bin/{name}"
    if found is None:
        raise PrometheusError(f"the `{name}` binary was not found; {INSTALL_HINT}")
    return found


def prometheus_binary() -> str:
    """Path of the `prometheus` executable (PATH, else /usr/bin).

    Raises:
        PrometheusError: it is not installed (the message says how to install it).
    """
    return _find_binary("prometheus")


def promtool_binary() -> str:
    """Path of `promtool` (shipped with Debian's prometheus package).

    Raises:
        PrometheusError: it is not installed (the message says how to install it).
    """
    return _find_binary("promtool")


def prometheus_available() -> bool:
    """Whether the `prometheus` binary is installed."""
    try:
        prometheus_binary()
    except PrometheusError:
        return False
    return True


def check_rules(paths: Iterable[Path], timeout_s: float = 60.0) -> str:
    """Validate rule files with `promtool check rules`.

    Returns:
        promtool's report.

    Raises:
        PrometheusError: promtool is missing or a file is invalid (with promtool's output).
    """
    cmd = [promtool_binary(), "check", "rules", *(str(p) for p in paths)]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise PrometheusError(
            f"`promtool check rules` failed (exit {result.returncode}):\n{output}"
        )
    return output


# --------------------------------------------------------------------------- config
def project_root() -> Path:
    """The checkout holding `serve_app/` (and `ops/`)."""
    return Path(__file__).resolve().parent.parent


def default_rule_files() -> list[Path]:
    """`ops/prometheus/fleet-rules.yml` of this checkout, when it is there."""
    path = project_root() / "ops" / "prometheus" / "fleet-rules.yml"
    return [path] if path.is_file() else []


def ray_service_discovery_file(session_dir: Path | str) -> Path:
    """The file-SD file Ray's dashboard writes for one session (all alive nodes)."""
    return Path(session_dir) / RAY_SD_FILE


def _duration(seconds: float) -> str:
    """A Prometheus duration: whole milliseconds (`2s`, `1500ms`)."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def prometheus_config(
    scrape_targets: Sequence[str] = (),
    file_sd_files: Sequence[Path] = (),
    rule_files: Sequence[Path] = (),
    scrape_interval_s: float = SCRAPE_INTERVAL_S,
) -> dict[str, Any]:
    """The prometheus.yml content: one `ray` job over static targets and/or file-SD files.

    Raises:
        ValueError: there is nothing to scrape.
    """
    if not scrape_targets and not file_sd_files:
        raise ValueError("give scrape_targets and/or file_sd_files: nothing to scrape")
    interval = _duration(scrape_interval_s)
    job: dict[str, Any] = {
        "job_name": JOB_NAME,
        "scrape_interval": interval,
        "scrape_timeout": interval,  # may not exceed the interval
    }
    if file_sd_files:
        job["file_sd_configs"] = [
            {
                "files": [str(Path(f).resolve()) for f in file_sd_files],
                "refresh_interval": _duration(SD_REFRESH_S),
            }
        ]
    if scrape_targets:
        job["static_configs"] = [{"targets": list(scrape_targets), "labels": {"job": JOB_NAME}}]
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": [job],
    }


# --------------------------------------------------------------------------- server
class PrometheusServer(ManagedProcess):
    """One Prometheus process on 127.0.0.1, started and stopped by this object.

    Args:
        data_dir: Folder for the config, the TSDB (`tsdb/`) and the log (created if missing).
        port: HTTP port on 127.0.0.1; default: a free port.
        scrape_targets: Static `host:port` targets (Ray metrics export ports).
        file_sd_files: File-SD files to discover targets from (Ray's, see
            `ray_service_discovery_file`); preferred, they list every Ray node.
        rule_files: Alert/recording rule files; default: `default_rule_files()`.
        scrape_interval_s: Scrape and rule-evaluation interval.
        retention: TSDB retention (`--storage.tsdb.retention.time`).
        log_path: Where Prometheus's output goes (appended); default `data_dir/prometheus.log`.
    """

    error = PrometheusError

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        scrape_targets: Sequence[str] = (),
        rule_files: Sequence[Path] | None = None,
        *,
        file_sd_files: Sequence[Path] = (),
        scrape_interval_s: float = SCRAPE_INTERVAL_S,
        retention: str = DEFAULT_RETENTION,
        log_path: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port if port is not None else find_free_port()
        self.scrape_targets = list(scrape_targets)
        self.file_sd_files = [Path(f) for f in file_sd_files]
        self.rule_files = [
            Path(f) for f in (default_rule_files() if rule_files is None else rule_files)
        ]
        self.scrape_interval_s = scrape_interval_s
        self.retention = retention
        super().__init__(Path(log_path) if log_path is not None else self.data_dir / LOG_NAME)

    def __repr__(self) -> str:
        return (
            f"PrometheusServer(endpoint_url={self.endpoint_url!r}, "
            f"data_dir={str(self.data_dir)!r}, pid={self._pid})"
        )

    # ------------------------------------------------------------------ properties
    @property
    def endpoint_url(self) -> str:
        """`http://127.0.0.1:<port>`: the web UI and HTTP API."""
        return f"http://{HOST}:{self.port}"

    @property
    def config_path(self) -> Path:
        """The prometheus.yml this server runs with."""
        return self.data_dir / CONFIG_NAME

    @property
    def tsdb_path(self) -> Path:
        """Where the TSDB lives."""
        return self.data_dir / TSDB_DIR

    def command(self) -> list[str]:
        """The `prometheus` command line (loopback listener, our config and data folder)."""
        return [
            prometheus_binary(),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.tsdb_path}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address={HOST}:{self.port}",
            "--log.level=info",
        ]

    def write_config(self) -> Path:
        """Write prometheus.yml (mode 0600) and return its path."""
        config = prometheus_config(
            self.scrape_targets, self.file_sd_files, self.rule_files, self.scrape_interval_s
        )
        text = "# written by fleetserve (devstack/prometheus.py); rewritten on every start\n"
        write_private_file(self.config_path, text + yaml.safe_dump(config, sort_keys=False))
        return self.config_path

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Write the config and launch Prometheus in its own session (see `wait_ready`).

        Raises:
            PrometheusError: the binary is missing, it already runs, or the port is taken.
        """
        if self.is_running():
            raise PrometheusError(f"Prometheus is already running (pid {self._pid})")
        cmd = self.command()  # raises with the install hint when the binary is missing
        if port_is_open(self.port):
            raise PrometheusError(
                f"port {self.port} on {HOST} is already in use; cannot start Prometheus there"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tsdb_path.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self._spawn(cmd, cwd=self.data_dir)
        logger.info(
            "prometheus started",
            extra={
                "pid": self._pid,
                "endpoint_url": self.endpoint_url,
                "log_path": str(self.log_path),
            },
        )

    def is_ready(self) -> bool:
        """Whether `GET /-/ready` answers 200."""
        try:
            return httpx.get(f"{self.endpoint_url}/-/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Poll `/-/ready` until it answers 200.

        Returns:
            Seconds waited.

        Raises:
            PrometheusError: the process exited or the deadline passed.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        while not self.is_ready():
            if not self.is_running():
                raise PrometheusError(
                    f"Prometheus exited before it was ready; see {self.log_path}\n"
                    + self.log_tail()
                )
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"Prometheus at {self.endpoint_url} not ready after {timeout_s:.0f}s; "
                    f"see {self.log_path}"
                )
            time.sleep(_POLL_S)
        waited = time.monotonic() - started
        logger.info(
            "prometheus ready", extra={"endpoint_url": self.endpoint_url, "ready_s": waited}
        )
        return waited

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM our process group (Prometheus flushes and exits), SIGKILL it on timeout.

        Only the recorded process is signalled, and only while its pid still belongs to the
        process that was started (same start time).

        Returns:
            True when a running server was stopped.
        """
        pid = self._pid
        if not super().stop(timeout_s):
            return False
        self._wait_port_closed(self.port, poll_s=_POLL_S)
        logger.info("prometheus stopped", extra={"pid": pid, "endpoint_url": self.endpoint_url})
        return True

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """What another process needs to adopt (and stop) this server."""
        return {
            **self._process_state(),
            "port": self.port,
            "endpoint_url": self.endpoint_url,
            "data_dir": str(self.data_dir),
            "log_path": str(self.log_path),
            "scrape_targets": self.scrape_targets,
            "file_sd_files": [str(f) for f in self.file_sd_files],
            "rule_files": [str(f) for f in self.rule_files],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PrometheusServer:
        """A server object for a `state()` dict; adopts its process if one is recorded."""
        server = cls(
            Path(state["data_dir"]),
            port=int(state["port"]),
            scrape_targets=list(state.get("scrape_targets") or []),
            rule_files=[Path(f) for f in state.get("rule_files") or []],
            file_sd_files=[Path(f) for f in state.get("file_sd_files") or []],
            log_path=Path(state["log_path"]) if state.get("log_path") else None,
        )
        server._adopt(state)
        return server

    # ------------------------------------------------------------------ HTTP API
    def api(
        self, path: str, params: Mapping[str, Any] | None = None, timeout_s: float = 30.0
    ) -> Any:
        """`GET /api/v1/<path>` and return its `data`.

        Raises:
            PrometheusError: no answer, or Prometheus reported an error.
        """
        url = f"{self.endpoint_url}/api/v1/{path.lstrip('/')}"
        try:
            resp = httpx.get(url, params=dict(params or {}), timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise PrometheusError(
                f"Prometheus at {self.endpoint_url} did not answer ({type(exc).__name__})"
            ) from exc
        try:
            body = resp.json()
        except ValueError as exc:
            raise PrometheusError(f"GET {path}: HTTP {resp.status_code}, not JSON") from exc
        if body.get("status") != "success":
            kind, message = body.get("errorType", "error"), body.get("error", resp.text[:300])
            raise PrometheusError(f"GET {path}: {kind}: {message}")
        return body.get("data")

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Evaluate an instant query (`/api/v1/query`).

        Args:
            promql: The PromQL expression.
            at: Evaluation time (unix seconds); default: now.

        Returns:
            The result list: for a vector, `[{"metric": {...}, "value": [ts, "v"]}, ...]`;
            a scalar or string result comes back as one such entry with an empty metric.
        """
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", params)
        result = data.get("result")
        if isinstance(result, list):
            return result
        return [{"metric": {}, "value": result}]

    def query_by(self, promql: str, label: str) -> dict[str, float]:
        """An instant vector query as `{value of label: float}` (e.g. per `model`)."""
        out: dict[str, float] = {}
        for row in self.query(promql):
            key = str(row.get("metric", {}).get(label, ""))
            with contextlib.suppress(KeyError, IndexError, TypeError, ValueError):
                out[key] = float(row["value"][1])
        return out

    def active_targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (`/api/v1/targets`): scrapeUrl, health, lastError..."""
        data = self.api("targets", {"state": "active"})
        return list(data.get("activeTargets") or [])

    def rule_groups(self) -> list[dict[str, Any]]:
        """The loaded rule groups (`/api/v1/rules`), with each rule's health."""
        return list(self.api("rules").get("groups") or [])
