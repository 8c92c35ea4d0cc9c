"""Unit tests of `devstack.process` and `devstack.ports`: the shared helpers and
`ManagedProcess`, with small Python child processes standing in for the servers."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import ports
from devstack.ports import find_free_port, find_free_ports
from devstack.process import (
    ManagedProcess,
    pid_alive,
    process_fingerprint,
    process_matches,
    session_members,
    terminate_process_group,
    write_private_file,
)

pytestmark = pytest.mark.unit


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- helpers
def test_free_ports_are_distinct_loopback_ports() -> None:
    ports = find_free_ports(12)
    assert len(set(ports)) == 12
    assert all(0 < p < 65536 for p in ports)
    assert 0 < find_free_port() < 65536


def test_free_ports_avoid_the_ephemeral_range() -> None:
    """Outgoing connections take source ports from the ephemeral range; a listen port chosen
    there can be gone by the time the server binds it."""
    candidates = ports.listen_port_range()
    if not candidates:
        pytest.skip("no ephemeral port range to avoid on this system")
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert not set(candidates) & set(range(low, high + 1))
    assert not set(candidates) & set(range(10002, 20000))  # Ray's worker ports
    for port in find_free_ports(20):
        assert port in candidates
        assert not ports.port_is_open(port)


def test_seaweed_reexports_what_other_modules_import() -> None:
    from devstack import seaweed

    assert seaweed.find_free_port is find_free_port
    assert seaweed.port_is_open is ports.port_is_open
    assert {"find_free_port", "port_is_open", "SeaweedServer"} <= set(seaweed.__all__)


def test_write_private_file_is_0600_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "secret.json"
    write_private_file(path, "one")
    write_private_file(path, "two")
    assert path.read_text() == "two"
    assert _mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["secret.json"]


def test_fingerprint_identifies_this_process() -> None:
    me = os.getpid()
    fingerprint = process_fingerprint(me)
    assert fingerprint is not None
    assert process_matches(me, fingerprint)
    assert not process_matches(me, "proc:0")
    assert not process_matches(2**22 + 12345, None)


def test_terminate_refuses_a_pid_that_is_not_the_recorded_process() -> None:
    # A reused pid (fingerprint mismatch) is never signalled: this very process survives.
    assert terminate_process_group(os.getpid(), fingerprint="proc:0") is False


def test_terminate_stops_a_child_in_its_own_session() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"],
        start_new_session=True,
    )
    try:
        assert terminate_process_group(child.pid, popen=child, timeout_s=10) is True
        assert child.returncode is not None
        assert terminate_process_group(child.pid, popen=child) is False
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


class _NotOurs(Exception):
    pass


def test_terminate_refuses_a_process_that_leads_no_group() -> None:
    # A child in our own process group: signalling its "group" would hit this test run.
    child = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(600)"])
    try:
        with pytest.raises(_NotOurs, match="not a process-group leader"):
            terminate_process_group(
                child.pid, fingerprint=process_fingerprint(child.pid), error=_NotOurs
            )
        assert child.poll() is None  # never signalled
    finally:
        child.kill()
        child.wait()


_GRANDCHILD = """
import os, signal, subprocess, sys, time
code = (
    "import os, signal, time\\n"
    "os.setpgid(0, 0)\\n"  # leaves the group, like Ray workers do; stays in the session
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "print(os.getpid(), flush=True)\\n"
    "time.sleep(600)\\n"
)
subprocess.Popen([sys.executable, "-c", code])
time.sleep(600)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="session sweep needs /proc")
def test_terminate_also_stops_leftovers_in_other_process_groups() -> None:
    leader = subprocess.Popen(
        [sys.executable, "-c", _GRANDCHILD], stdout=subprocess.PIPE, start_new_session=True
    )
    assert leader.stdout is not None
    grandchild = int(leader.stdout.readline())
    try:
        assert sorted(session_members(leader.pid)) == sorted([leader.pid, grandchild])
        assert os.getpgid(grandchild) == grandchild
        assert terminate_process_group(leader.pid, popen=leader, timeout_s=10, leftover_grace_s=0.2)
        assert not pid_alive(grandchild)
        assert session_members(leader.pid) == []
    finally:
        leader.stdout.close()
        if leader.poll() is None:
            leader.kill()
            leader.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


# --------------------------------------------------------------------------- ManagedProcess
class SleeperError(Exception):
    pass


_SLEEPER = "import sys, time\nprint('ready', flush=True)\nprint('oops', file=sys.stderr)\n"


class Sleeper(ManagedProcess):
    """A child that says `ready` and sleeps; `fail_ready` makes wait_ready give up."""

    error = SleeperError

    def __init__(self, log_path: Path, fail_ready: bool = False) -> None:
        super().__init__(log_path)
        self.fail_ready = fail_ready
        self.started_pids: list[int] = []

    def start(self) -> None:
        self._spawn([sys.executable, "-c", _SLEEPER + "time.sleep(600)"], cwd=self.log_path.parent)
        assert self.pid is not None
        self.started_pids.append(self.pid)

    def wait_ready(self, timeout_s: float = 10.0) -> float:
        started = time.monotonic()
        while "ready" not in self.log_tail():
            if time.monotonic() - started > timeout_s:
                raise SleeperError("not ready")
            time.sleep(0.05)
        if self.fail_ready:
            raise SleeperError("ready, but refused")
        return time.monotonic() - started


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[Sleeper]:
    proc = Sleeper(tmp_path / "logs" / "sleeper.log")
    try:
        yield proc
    finally:
        proc.stop(timeout_s=5.0)


def test_context_manager_runs_the_process_in_its_own_session(sleeper: Sleeper) -> None:
    with sleeper as proc:
        pid = proc.pid
        assert pid is not None
        assert proc.is_running()
        assert os.getpgid(pid) == pid
        assert os.getsid(pid) == pid
        assert proc.fingerprint == process_fingerprint(pid)
        assert _mode(proc.log_path) == 0o600
        assert "ready" in proc.log_tail()
    assert proc.pid is None
    assert proc.fingerprint is None
    assert not proc.is_running()
    assert not pid_alive(pid)


def test_log_is_appended_and_stderr_goes_there_too(sleeper: Sleeper) -> None:
    sleeper.log_path.parent.mkdir(parents=True)
    sleeper.log_path.write_text("earlier run\n")
    with sleeper:
        deadline = time.monotonic() + 10
        while "oops" not in sleeper.log_tail() and time.monotonic() < deadline:
            time.sleep(0.05)
    log = sleeper.log_path.read_text()
    assert log.startswith("earlier run\n")
    assert "ready" in log
    assert "oops" in log
    assert sleeper.log_tail(max_bytes=5) == log[-5:]


def test_failed_wait_ready_stops_the_process(tmp_path: Path) -> None:
    proc = Sleeper(tmp_path / "sleeper.log", fail_ready=True)
    with pytest.raises(SleeperError, match="refused"), proc:
        pytest.fail("the body must not run")
    (pid,) = proc.started_pids
    assert proc.pid is None
    assert not pid_alive(pid)


def test_adopted_process_is_stopped_by_pid_and_fingerprint(sleeper: Sleeper) -> None:
    sleeper.start()
    state = sleeper._process_state()
    assert state == {"pid": sleeper.pid, "fingerprint": sleeper.fingerprint}

    stranger = Sleeper(sleeper.log_path)
    stranger._adopt({**state, "fingerprint": "proc:0"})  # the pid was reused by another
    assert not stranger.is_running()
    assert stranger.stop() is False  # nothing signalled
    assert sleeper.is_running()

    adopted = Sleeper(sleeper.log_path)
    adopted._adopt(state)
    assert adopted.pid == sleeper.pid
    assert adopted.is_running()
    assert adopted.stop(timeout_s=5.0) is True
    assert adopted.pid is None
    assert not sleeper.is_running()  # our child has exited (and is reaped now)
    assert sleeper.stop() is False


def test_adopt_without_a_pid_adopts_nothing(tmp_path: Path) -> None:
    proc = Sleeper(tmp_path / "never.log")
    proc._adopt({"pid": None, "fingerprint": None})
    assert proc.pid is None
    assert not proc.is_running()
    assert proc.stop() is False
    proc.kill()  # nothing recorded: a no-op
    assert proc.log_tail() == ""  # no log yet


def test_kill_crashes_the_process_and_start_brings_it_back(sleeper: Sleeper) -> None:
    with sleeper:
        sleeper.kill()
        assert sleeper.pid is None
        assert not pid_alive(sleeper.started_pids[0])
        sleeper.start()
        assert sleeper.is_running()
    assert len(sleeper.started_pids) == 2


def test_stop_raises_the_subclass_error_for_a_pid_that_leads_no_group(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(600)"])
    try:
        proc = Sleeper(tmp_path / "x.log")
        proc._adopt({"pid": child.pid, "fingerprint": process_fingerprint(child.pid)})
        with pytest.raises(SleeperError, match="not a process-group leader"):
            proc.stop()
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


# --------------------------------------------------------------------------- the servers
def test_servers_keep_their_state_format_and_error_types(tmp_path: Path) -> None:
    from devstack.prometheus import PrometheusError, PrometheusServer
    from devstack.ray_head import RayHead
    from devstack.seaweed import SeaweedError, SeaweedServer
    from devstack.state import StackError

    s3 = SeaweedServer(tmp_path / "s3", access_key="AK", secret_key="SK")
    prom = PrometheusServer(tmp_path / "prom", port=19090, scrape_targets=["127.0.0.1:1"])
    head = RayHead(tmp_path / "ray.log")
    assert list(s3.state()) == [
        "pid",
        "fingerprint",
        "data_dir",
        "log_path",
        "endpoint_url",
        "ports",
        "access_key",
        "secret_key",
        "region",
    ]
    assert list(prom.state()) == [
        "pid",
        "fingerprint",
        "port",
        "endpoint_url",
        "data_dir",
        "log_path",
        "scrape_targets",
        "file_sd_files",
        "rule_files",
    ]
    assert list(head.state()) == [
        "pid",
        "fingerprint",
        "gcs_port",
        "dashboard_port",
        "metrics_export_port",
        "log_path",
    ]
    gone = {"pid": 2**22 + 12345, "fingerprint": "proc:1"}
    for server, error in ((s3, SeaweedError), (prom, PrometheusError), (head, StackError)):
        assert isinstance(server, ManagedProcess)
        assert server.error is error
        adopted = type(server).from_state({**server.state(), **gone})
        assert adopted.state() == {**server.state(), **gone}
        assert adopted.pid == gone["pid"]
        assert not adopted.is_running()
        assert not adopted.stop()
    assert prom.log_path == (tmp_path / "prom" / "prometheus.log").resolve()
    assert s3.log_path == (tmp_path / "s3" / "weed.log").resolve()
