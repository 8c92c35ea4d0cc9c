"""Unit tests of the SeaweedFS manager and the local-stack helpers that need no server
(the shared process helpers are tested in test_process.py)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from devstack import ray_head, seaweed, serve_cli, stack, state, summary
from devstack.seaweed import (
    S3_ACTIONS,
    SeaweedPorts,
    SeaweedServer,
    s3_identities_config,
    weed_command,
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


def test_weed_binary_is_found() -> None:
    assert Path(seaweed.weed_binary()).name == "weed"


# ----------------------------------------------------------------------- stack helpers
def test_stack_env_empty_without_state(tmp_path: Path) -> None:
    assert state.load_stack_env(tmp_path) == {}
    (tmp_path / "stack.json").write_text("not json")
    assert state.load_stack_env(tmp_path) == {}


def test_stack_env_empty_when_recorded_server_is_gone(tmp_path: Path) -> None:
    server = SeaweedServer(tmp_path / "s3", access_key="AK", secret_key="SK")
    recorded = {"s3": {**server.state(), "pid": 2**22 + 12345, "fingerprint": "proc:1"}}
    state.save_state(tmp_path, recorded)
    assert _mode(tmp_path / "stack.json") == 0o600
    assert state.load_stack_env(tmp_path) == {}


def test_ray_auth_token_created_once_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_path = tmp_path / "ray" / "auth_token"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_path))
    assert ray_head.ensure_ray_auth_token() == token_path
    token = token_path.read_text()
    assert len(token) == 64
    assert _mode(token_path) == 0o600
    assert ray_head.ensure_ray_auth_token() == token_path
    assert token_path.read_text() == token  # reused, never rotated
    assert ray_head.ray_auth_headers() == {"Authorization": f"Bearer {token}"}
    env = ray_head.ray_cli_env()
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_ray_auth_token_from_env_needs_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    assert ray_head.ensure_ray_auth_token() is None
    assert not (tmp_path / "none").exists()


def test_ray_head_command_is_loopback_only(tmp_path: Path) -> None:
    head = ray_head.RayHead(tmp_path / "ray.log")
    cmd = head.command()
    assert cmd[1:4] == ["start", "--head", "--block"]
    assert "--node-ip-address=127.0.0.1" in cmd
    assert "--dashboard-host=127.0.0.1" in cmd
    assert head.dashboard_url == "http://127.0.0.1:8265"
    assert head.gcs_address == "127.0.0.1:6379"


def test_serve_http_url_reads_http_options(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("http_options:\n  host: 127.0.0.1\n  port: 8123\napplications: []\n")
    assert serve_cli.serve_http_url(config) == "http://127.0.0.1:8123"
    config.write_text("applications: []\n")
    assert serve_cli.serve_http_url(config) == "http://127.0.0.1:8000"


def test_shorten_elides_long_values() -> None:
    short = summary.shorten({"data": [[0.123456789] * 384], "model_id": "m" * 200})
    assert short["data"][0][:4] == [0.1235] * 4
    assert short["data"][0][4] == "... 380 more"
    assert short["model_id"].endswith("...")


def test_down_without_state_is_harmless(tmp_path: Path) -> None:
    stack.down(tmp_path)
    assert not (tmp_path / "stack.json").exists()
