"""A real SeaweedFS S3 server: signed access only, data kept across stop/kill and restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from botocore.exceptions import EndpointConnectionError

from devstack.seaweed import SeaweedServer, port_is_open

pytestmark = pytest.mark.integration

PAYLOAD = b"fleetserve" * 100_000  # ~1 MB: more than one S3 part in some clients


def _fs(server: SeaweedServer, secret: str | None = None, anon: bool = False) -> s3fs.S3FileSystem:
    """A fresh s3fs client for `server` (no instance or listings cache, no retries)."""
    options = server.storage_options()
    if secret is not None:
        options["secret"] = secret
    if anon:
        options.pop("key")
        options.pop("secret")
    return s3fs.S3FileSystem(
        **options,
        anon=anon,
        skip_instance_cache=True,
        use_listings_cache=False,
        config_kwargs={
            "connect_timeout": 2,
            "read_timeout": 10,
            "retries": {"max_attempts": 1, "mode": "standard"},
        },
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SeaweedServer]:
    s3 = SeaweedServer(tmp_path / "s3")
    s3.start()
    try:
        s3.wait_ready(timeout_s=60)
        yield s3
    finally:
        s3.stop()
    assert not s3.is_running()


def _all_ports_closed(server: SeaweedServer) -> bool:
    return not any(port_is_open(p) for p in server.ports.as_dict().values())


def test_signed_put_get_and_wrong_key_rejected(server: SeaweedServer) -> None:
    fs = _fs(server)
    fs.mkdir("fleet")
    fs.pipe_file("fleet/models/m/v1/blob.bin", PAYLOAD)
    assert fs.cat_file("fleet/models/m/v1/blob.bin") == PAYLOAD
    assert fs.ls("fleet/models/m/v1") == ["fleet/models/m/v1/blob.bin"]

    with pytest.raises(PermissionError):
        _fs(server, secret="not-the-secret").cat_file("fleet/models/m/v1/blob.bin")
    with pytest.raises(PermissionError):
        _fs(server, anon=True).cat_file("fleet/models/m/v1/blob.bin")
    with pytest.raises(PermissionError):
        _fs(server, secret="not-the-secret").pipe_file("fleet/models/m/v1/evil", b"x")


def test_stop_closes_ports_and_restart_keeps_data(server: SeaweedServer) -> None:
    fs = _fs(server)
    fs.mkdir("fleet")
    fs.pipe_file("fleet/keep.bin", PAYLOAD)
    pid = server.pid

    server.stop()
    assert server.pid is None
    assert not server.is_running()
    assert _all_ports_closed(server)
    with pytest.raises(EndpointConnectionError):  # "S3 down": connections are refused
        _fs(server).cat_file("fleet/keep.bin")

    server.start()
    assert server.pid != pid
    server.wait_ready(timeout_s=60)
    assert _fs(server).cat_file("fleet/keep.bin") == PAYLOAD


def test_kill_then_restart_on_same_dir_and_ports_keeps_data(server: SeaweedServer) -> None:
    fs = _fs(server)
    fs.mkdir("fleet")
    fs.pipe_file("fleet/crash.bin", PAYLOAD)
    ports = server.ports

    server.kill()
    assert not server.is_running()
    assert not port_is_open(ports.s3)

    server.start()
    server.wait_ready(timeout_s=60)
    assert server.ports == ports
    assert _fs(server).cat_file("fleet/crash.bin") == PAYLOAD


def test_adopted_from_state_file_can_be_stopped(server: SeaweedServer, tmp_path: Path) -> None:
    state_file = tmp_path / "seaweed.json"
    server.save_state(state_file)

    adopted = SeaweedServer.from_state(state_file)
    assert adopted.pid == server.pid
    assert adopted.is_running()
    assert adopted.is_serving()
    adopted.stop()
    assert not adopted.is_running()
    assert _all_ports_closed(server)


def test_two_servers_side_by_side(tmp_path: Path) -> None:
    with (
        SeaweedServer(tmp_path / "one") as one,
        SeaweedServer(tmp_path / "two") as two,
    ):
        assert one.endpoint_url != two.endpoint_url
        assert not set(one.ports.as_dict().values()) & set(two.ports.as_dict().values())
        _fs(one).mkdir("bucket-one")
        _fs(two).mkdir("bucket-two")
        assert _fs(one).ls("") == ["bucket-one"]
        assert _fs(two).ls("") == ["bucket-two"]
        with pytest.raises(PermissionError):  # one server's keys mean nothing to the other
            _fs(two, secret=one.secret_key).ls("bucket-two")
    assert not one.is_running()
    assert not two.is_running()
    assert _all_ports_closed(one)
    assert _all_ports_closed(two)
