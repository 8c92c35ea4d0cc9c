"""Ray worker nodes of the local stack: `fleetserve up --workers N`.

Each worker is its own raylet on this machine, started as `ray start --address=... --block`
against the head `devstack.ray_head` runs, with its own loopback address (worker i binds
127.0.0.<1+i>, so every node has an IP of its own, as on a real cluster), its own ports
(node manager, object manager, metrics, dashboard agent, runtime env agent), its own CPU
count, and two marks that tell it apart:

- a Ray node label `fleet-node=worker-<i>`, which model-host replicas report as their
  node's readable name (`/v1/replicas`, `fleetserve models`, the replica gauges);
- a custom resource `fleet_node_<i>: 1`, so a deployment (or a test) can be placed on one
  given node (`ray_actor_options.resources`), the way a GPU worker group is targeted on a
  real cluster.

Everything binds loopback addresses (127.0.0.0/8) and authenticates with the head's token
(`RAY_AUTH_MODE=token`). The head keeps Ray's single-machine switch
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which pins it to 127.0.0.1), but `ray start` refuses
to join a cluster under that switch, so workers run with Ray's Linux default instead; then
Ray rewrites a literal 127.0.0.1 to the machine's routable address, which is why a worker's
node address is 127.0.0.<1+i> and the head's GCS is given as `[::ffff:127.0.0.1]:<port>`
(the same loopback socket, spelled so that Ray keeps it). Workers start one at a time.

`up` records each worker's pid and fingerprint in `stack.json` under `workers`, and `down`
stops exactly those processes: SIGTERM to `ray start --block`, which stops the raylet and
every Ray process it started, then a sweep of the session it led.
`RayWorker.crash_raylet()` kills only the raylet (SIGKILL), the way a node dies, for the
node-loss tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from devstack.ports import HOST, find_free_ports
from devstack.process import ManagedProcess, pid_alive, session_members
from devstack.ray_head import (
    DASHBOARD_URL,
    RAY_AUTH_ENV,
    RAY_LOOPBACK_ENV,
    RAY_READY_TIMEOUT_S,
    RAY_STOP_TIMEOUT_S,
    ray_auth_headers,
    venv_tool,
)
from devstack.state import StackError, save_state, say

logger = logging.getLogger(__name__)

NODE_LABEL = "fleet-node"
MAX_WORKERS = 250
OBJECT_STORE_BYTES = 256 * 2**20  # Serve passes small objects; /dev/shm is shared
# NOTE: Ray's own default on Linux (multi-node clusters allowed), for the workers' `ray start`.
WORKER_CLUSTER_ENV = dict.fromkeys(RAY_LOOPBACK_ENV, "1")
DEFAULT_WORKER_CPUS = 2.0
_POLL_S = 0.5
CURRENT_CLUSTER_WAIT_S = 10.0
_PORT_NAMES = (
    "node_manager_port",
    "object_manager_port",
    "metrics_export_port",
    "dashboard_agent_listen_port",
    "dashboard_agent_grpc_port",
    "runtime_env_agent_port",
)


def node_name(index: int) -> str:
    """The readable name (Ray node label `fleet-node`) of worker `index` (1-based)."""
    return f"worker-{index}"


def node_ip(index: int) -> str:
    """The loopback address worker `index` (1-based) binds: 127.0.0.2, 127.0.0.3, ..."""
    if not 1 <= index <= MAX_WORKERS:
        raise StackError(f"worker numbers go from 1 to {MAX_WORKERS}, not {index}")
    return f"127.0.0.{1 + index}"


def bootstrap_address(gcs_address: str) -> str:
    """The head's GCS address as a worker's `ray start --address` must spell it.

    `ray start` on a multi-node cluster rewrites a literal `127.0.0.1` (or `localhost`) to
    the machine's routable address, where the loopback-only GCS does not listen; the same
    socket written as an IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]:port`) is kept.
    """
    host, _, port = gcs_address.rpartition(":")
    return f"[::ffff:{host}]:{port}" if host == HOST else gcs_address


def node_resource(index: int) -> str:
    """The custom resource only worker `index` has (one unit)."""
    return f"fleet_node_{index}"


def list_nodes(dashboard_url: str = DASHBOARD_URL) -> list[dict[str, Any]]:
    """Every node the head knows (Ray's state API): node_id, state, labels, resources.

    Raises:
        StackError: the dashboard does not answer.
    """
    try:
        resp = httpx.get(
            f"{dashboard_url}/api/v0/nodes",
            params={"limit": 1000, "detail": "true"},
            headers=ray_auth_headers(),
            timeout=10.0,
        )
        resp.raise_for_status()
        return list(resp.json()["data"]["result"]["result"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise StackError(f"the Ray dashboard at {dashboard_url} did not list nodes: {exc}") from exc


def node_env(aws_env: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A worker node's environment: `base` (this process's) with the S3 variables replaced
    by `aws_env` and the checkout on PYTHONPATH, as the head gets it (replicas inherit it)."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not k.startswith("AWS_")}
    env.update(aws_env)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class RayWorker(ManagedProcess):
    """One Ray worker node on 127.0.0.1, run as `ray start --address=... --block`.

    Args:
        index: 1-based worker number (its name is `worker-<index>`).
        gcs_address: The head's `127.0.0.1:<port>`.
        log_path: Where `ray start` writes its output (appended).
        num_cpus: CPUs the node offers to Ray.
        env: The node's environment (S3 variables, PYTHONPATH); replicas inherit it.
        ports: Recorded ports to reuse (`state()`), else free ones are taken at start.
    """

    error = StackError
    signal_group_first = False  # `ray start --block` stops its own Ray processes
    leftover_grace_s = 15.0

    def __init__(
        self,
        index: int,
        gcs_address: str,
        log_path: Path,
        num_cpus: float = DEFAULT_WORKER_CPUS,
        env: Mapping[str, str] | None = None,
        ports: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(log_path)
        self.index = index
        self.gcs_address = gcs_address
        self.num_cpus = num_cpus
        self.env = dict(env) if env is not None else dict(os.environ)
        self.ports: dict[str, int] = dict(ports or {})

    @property
    def node_ip(self) -> str:
        """`127.0.0.<1 + index>`: a loopback address of its own, like a machine's IP."""
        return node_ip(self.index)

    @property
    def name(self) -> str:
        """`worker-<index>`, the node's `fleet-node` label."""
        return node_name(self.index)

    def command(self) -> list[str]:
        """The `ray start` command line (ports must be chosen)."""
        resources = json.dumps({node_resource(self.index): 1})
        return [
            venv_tool("ray"),
            "start",
            f"--address={bootstrap_address(self.gcs_address)}",
            "--block",
            f"--node-ip-address={self.node_ip}",
            f"--num-cpus={self.num_cpus:g}",
            f"--resources={resources}",
            f"--labels={NODE_LABEL}={self.name}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            *(f"--{key.replace('_', '-')}={self.ports[key]}" for key in _PORT_NAMES),
            "--disable-usage-stats",
        ]

    def start(self) -> None:
        """Launch the worker in its own session (returns at once; see `wait_ready`)."""
        if not self.ports:
            self.ports = dict(zip(_PORT_NAMES, find_free_ports(len(_PORT_NAMES)), strict=True))
        path = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        # NOTE: the head's loopback switch would make `ray start` refuse to join (it
        # treats a worker node as unsupported then); see the module docstring.
        env = {**self.env, **RAY_AUTH_ENV, **WORKER_CLUSTER_ENV, "PATH": path}
        self._spawn(self.command(), env=env)
        logger.info("ray worker started", extra={"pid": self.pid, "node": self.name})

    def node_id(self, dashboard_url: str = DASHBOARD_URL) -> str | None:
        """The Ray node id of this worker while the head lists it alive, else None."""
        for node in list_nodes(dashboard_url):
            labels = node.get("labels") or {}
            if labels.get(NODE_LABEL) == self.name and node.get("state") == "ALIVE":
                return str(node["node_id"])
        return None

    def wait_ready(
        self, timeout_s: float = RAY_READY_TIMEOUT_S, dashboard_url: str = DASHBOARD_URL
    ) -> float:
        """Poll until the head lists this node alive; returns seconds waited."""
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            with contextlib.suppress(StackError):
                if self.node_id(dashboard_url) is not None:
                    return time.monotonic() - started
            if not self.is_running():
                raise StackError(
                    f"`ray start` of {self.name} exited; see {self.log_path}\n{self.log_tail(3000)}"
                )
            if time.monotonic() >= deadline:
                raise StackError(
                    f"{self.name} not alive after {timeout_s:.0f}s; see {self.log_path}"
                )
            time.sleep(_POLL_S)

    def raylet_pid(self) -> int | None:
        """The pid of this node's raylet (a process of the session `ray start` leads)."""
        if self.pid is None or not self.is_running():
            return None
        for pid in session_members(self.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
        return None

    def crash_raylet(self) -> int:
        """Kill this node's raylet with SIGKILL, as when the machine dies; returns its pid.

        `ray start --block` notices and stops the rest of the node; `stop()` sweeps what is
        left.

        Raises:
            StackError: the node has no running raylet.
        """
        pid = self.raylet_pid()
        if pid is None:
            raise StackError(f"{self.name} has no running raylet")
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self, timeout_s: float = RAY_STOP_TIMEOUT_S) -> bool:
        """SIGTERM `ray start --block` (it stops the node), then sweep its session."""
        return super().stop(timeout_s)

    def sweep_leftovers(self) -> int:
        """SIGKILL what is left of a node whose `ray start` already exited (a crashed node:
        Ray workers that outlived their raylet). Returns how many processes were signalled.

        Only members of the session our `ray start` led are signalled, and only while its
        pid is not taken by another process: the kernel hands out no pid that is still in
        use as a session id, so those members descend from the process we started.
        """
        if self.pid is None or pid_alive(self.pid):
            return 0  # running (stop() handles it) or the pid now belongs to another process
        members = session_members(self.pid)
        for member in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(member, signal.SIGKILL)
        return len(members)

    def state(self) -> dict[str, Any]:
        """What `down` needs to find and stop this worker."""
        return {
            **self._process_state(),
            "index": self.index,
            "name": self.name,
            "num_cpus": self.num_cpus,
            "gcs_address": self.gcs_address,
            "ports": self.ports,
            "log_path": str(self.log_path),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RayWorker:
        """Adopt a worker recorded by `state()` (signalled only while it is that process)."""
        worker = cls(
            int(state["index"]),
            str(state["gcs_address"]),
            Path(state["log_path"]),
            num_cpus=float(state.get("num_cpus", DEFAULT_WORKER_CPUS)),
            ports=state.get("ports") or {},
        )
        worker._adopt(state)
        return worker


# --------------------------------------------------------------------------- stack steps
def ensure_workers(
    state_dir: Path,
    state: dict[str, Any],
    count: int,
    gcs_address: str,
    env: Mapping[str, str],
    num_cpus: float = DEFAULT_WORKER_CPUS,
    dashboard_url: str = DASHBOARD_URL,
) -> list[RayWorker]:
    """Make exactly `count` recorded workers run: adopt running ones, start missing ones
    (all at once, then wait), stop recorded ones beyond `count`. Records them in `state`.

    Raises:
        StackError: a worker did not come up (the ones started here are stopped again).
    """
    recorded = {int(w["index"]): w for w in state.get("workers") or []}
    for index in sorted(i for i in recorded if i > count):
        _stop_one(RayWorker.from_state(recorded.pop(index)))
    running: list[RayWorker] = []
    started: list[RayWorker] = []
    for index in range(1, count + 1):
        if index in recorded:
            worker = RayWorker.from_state(recorded[index])
            if worker.is_running() and worker.gcs_address == gcs_address:
                running.append(worker)
                continue
            _stop_one(worker)  # a leftover of an older head: nothing of it may remain
        log_path = state_dir / "logs" / f"ray-{node_name(index)}.log"
        started.append(RayWorker(index, gcs_address, log_path, num_cpus=num_cpus, env=env))
    if started:
        say(f"starting {len(started)} Ray worker node(s), {num_cpus:g} CPUs each")
    began = time.monotonic()
    workers = sorted(running + started, key=lambda w: w.index)
    try:
        # NOTE: one after the other: raylets that start at the same moment in one Ray
        # session pick the same socket and log names and one of them dies.
        for worker in started:
            worker.start()
            state["workers"] = [w.state() for w in workers if w.pid is not None]
            save_state(state_dir, state)
            worker.wait_ready(dashboard_url=dashboard_url)
            _point_drivers_at_head(gcs_address)
    except StackError:
        for worker in started:
            worker.stop()
        state["workers"] = [w.state() for w in running]
        save_state(state_dir, state)
        raise
    if started:
        names = ", ".join(w.name for w in started)
        say(f"Ray worker node(s) {names} alive in {time.monotonic() - began:.1f}s")
    for worker in running:
        say(f"Ray worker node {worker.name} already running (pid {worker.pid})")
    return workers


def _current_cluster_file() -> Path:
    """Ray's "current cluster" file (as `devstack.ray_head.forget_ray_address` finds it)."""
    temp_root = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    return Path(temp_root) / "ray" / "ray_current_cluster"


def _point_drivers_at_head(gcs_address: str) -> None:
    """Put the head's address back into Ray's "current cluster" file.

    Every `ray start` writes its `--address` there, so after a worker joined it holds the
    worker's spelling (`[::ffff:127.0.0.1]:port`), which the loopback hook
    (`devstack.ray_env`) does not recognise as the local head. Called after each worker
    is alive: its `ray start` writes the file a moment later, so this waits for that.
    """
    path = _current_cluster_file()
    deadline = time.monotonic() + CURRENT_CLUSTER_WAIT_S  # written just after the node joins
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == bootstrap_address(gcs_address):
                path.write_text(gcs_address)
                return
        time.sleep(_POLL_S / 5)


def _forget_bootstrap_address(gcs_address: str) -> None:
    path = _current_cluster_file()
    with contextlib.suppress(OSError):
        if path.read_text().strip() == bootstrap_address(gcs_address):
            path.unlink()


def _stop_one(worker: RayWorker) -> None:
    if worker.is_running():
        say(f"stopping Ray worker node {worker.name} (pid {worker.pid})")
        worker.stop()
    else:
        worker.sweep_leftovers()


def stop_workers(state_dir: Path, state: dict[str, Any]) -> None:
    """Stop every worker recorded in `state` (by pid and fingerprint) and forget them."""
    for recorded in state.get("workers") or []:
        worker = RayWorker.from_state(recorded)
        _stop_one(worker)
        _forget_bootstrap_address(worker.gcs_address)
    if "workers" in state:
        state.pop("workers")
        save_state(state_dir, state)
