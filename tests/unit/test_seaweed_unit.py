"""Unit tests of the SeaweedFS manager and the local-stack helpers that need no server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app import seaweed, stack
from serve_app.seaweed import (
    S3_ACTIONS,
    SeaweedPorts,
    SeaweedServer,
    find_free_port,
    find_free_ports,
    process_fingerprint,
    process_matches,
    s3_identities_config,
    terminate_process_group,
    weed_command,
    write_private_file,
)

pytestmark = pytest.mark.unit


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_identities_config_grants_one_key_every_action() -> None:
    doc = s3_identities_config("AKID", "SECRET")
    (identity,) = doc["identities"]
    assert identity["credentials"] == [{"accessKey": "AKID", "secretKey": "SECRET"}]
    assert set(identity["actions"]) == {"Admin", "Read", "Write", "List", "Tagging"}
    assert tuple(identity["actions"]) == S3_ACTIONS
    json.dumps(doc)  # what start() writes must be plain JSON


def test_free_ports_are_distinct_loopback_ports() -> None:
    ports = find_free_ports(12)
    assert len(set(ports)) == 12
    assert all(0 < p < 65536 for p in ports)
    assert 0 < find_free_port() < 65536


def test_ports_allocate_fixes_s3_and_keeps_all_distinct() -> None:
    ports = SeaweedPorts.allocate(s3_port=8333)
    values = list(ports.as_dict().values())
    assert ports.s3 == 8333
    assert len(set(values)) == len(values) == 10
    assert SeaweedPorts.from_dict(ports.as_dict()) == ports


def test_weed_command_binds_loopback_and_sets_every_port(tmp_path: Path) -> None:
    ports = SeaweedPorts.allocate()
    cmd = weed_command("weed", tmp_path, ports, tmp_path / "s3.json")
    assert cmd[:3] == ["weed", "-logtostderr", "mini"]
    assert "-ip=127.0.0.1" in cmd
    assert "-ip.bind=127.0.0.1" in cmd
    assert f"-dir={tmp_path}" in cmd
    assert f"-s3.config={tmp_path / 's3.json'}" in cmd
    for flag in ("-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"):
        assert flag in cmd
    flags = dict(arg.lstrip("-").split("=", 1) for arg in cmd[3:])
    port_flags = {k: int(v) for k, v in flags.items() if ".port" in k and k.count(".") <= 2}
    port_flags = {k: v for k, v in port_flags.items() if v != 0}
    assert sorted(port_flags.values()) == sorted(ports.as_dict().values())


def test_env_repr_and_state_keep_the_secret_where_it_belongs(tmp_path: Path) -> None:
    server = SeaweedServer(tmp_path / "s3", s3_port=18333, access_key="AK", secret_key="S3CR3T")
    assert server.endpoint_url == "http://127.0.0.1:18333"
    assert server.env() == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:18333",
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "S3CR3T",
        "AWS_REGION": "us-east-1",
    }
    assert "S3CR3T" not in repr(server)
    assert server.s3_config_path.parent == (tmp_path / "s3").resolve()

    state_file = tmp_path / "state.json"
    server.save_state(state_file)
    assert _mode(state_file) == 0o600
    adopted = SeaweedServer.from_state(state_file)
    assert adopted.env() == server.env()
    assert adopted.ports == server.ports
    assert adopted.pid is None
    assert not adopted.is_running()
    adopted.stop()  # nothing recorded: a no-op


def test_random_keys_differ_between_servers(tmp_path: Path) -> None:
    a = SeaweedServer(tmp_path / "a")
    b = SeaweedServer(tmp_path / "b")
    assert a.access_key != b.access_key
    assert a.secret_key != b.secret_key
    assert len(a.secret_key) >= 32


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
        assert sorted(seaweed.session_members(leader.pid)) == sorted([leader.pid, grandchild])
        assert os.getpgid(grandchild) == grandchild
        assert terminate_process_group(leader.pid, popen=leader, timeout_s=10, leftover_grace_s=0.2)
        assert not seaweed.pid_alive(grandchild)
        assert seaweed.session_members(leader.pid) == []
    finally:
        leader.stdout.close()
        if leader.poll() is None:
            leader.kill()
            leader.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


def test_weed_binary_is_found() -> None:
    assert Path(seaweed.weed_binary()).name == "weed"


# ----------------------------------------------------------------------- stack helpers
def test_stack_env_empty_without_state(tmp_path: Path) -> None:
    assert stack.load_stack_env(tmp_path) == {}
    (tmp_path / "stack.json").write_text("not json")
    assert stack.load_stack_env(tmp_path) == {}


def test_stack_env_empty_when_recorded_server_is_gone(tmp_path: Path) -> None:
    server = SeaweedServer(tmp_path / "s3", access_key="AK", secret_key="SK")
    state = {"s3": {**server.state(), "pid": 2**22 + 12345, "fingerprint": "proc:1"}}
    stack.save_state(tmp_path, state)
    assert _mode(tmp_path / "stack.json") == 0o600
    assert stack.load_stack_env(tmp_path) == {}


def test_ray_auth_token_created_once_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_path = tmp_path / "ray" / "auth_token"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_path))
    assert stack.ensure_ray_auth_token() == token_path
    token = token_path.read_text()
    assert len(token) == 64
    assert _mode(token_path) == 0o600
    assert stack.ensure_ray_auth_token() == token_path
    assert token_path.read_text() == token  # reused, never rotated
    assert stack.ray_auth_headers() == {"Authorization": f"Bearer {token}"}
    env = stack.ray_cli_env()
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_ray_auth_token_from_env_needs_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    assert stack.ensure_ray_auth_token() is None
    assert not (tmp_path / "none").exists()


def test_ray_head_command_is_loopback_only(tmp_path: Path) -> None:
    head = stack.RayHead(tmp_path / "ray.log")
    cmd = head.command()
    assert cmd[1:4] == ["start", "--head", "--block"]
    assert "--node-ip-address=127.0.0.1" in cmd
    assert "--dashboard-host=127.0.0.1" in cmd
    assert head.dashboard_url == "http://127.0.0.1:8265"
    assert head.gcs_address == "127.0.0.1:6379"


def test_serve_http_url_reads_http_options(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("http_options:\n  host: 127.0.0.1\n  port: 8123\napplications: []\n")
    assert stack.serve_http_url(config) == "http://127.0.0.1:8123"
    config.write_text("applications: []\n")
    assert stack.serve_http_url(config) == "http://127.0.0.1:8000"


def test_shorten_elides_long_values() -> None:
    short = stack._shorten({"data": [[0.123456789] * 384], "model_id": "m" * 200})
    assert short["data"][0][:4] == [0.1235] * 4
    assert short["data"][0][4] == "... 380 more"
    assert short["model_id"].endswith("...")


def test_down_without_state_is_harmless(tmp_path: Path) -> None:
    stack.down(tmp_path)
    assert not (tmp_path / "stack.json").exists()
