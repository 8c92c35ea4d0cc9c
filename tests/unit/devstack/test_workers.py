"""Worker nodes of the local stack: addresses, the `ray start` line, the recorded state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack.state import StackError
from devstack.workers import RayWorker, bootstrap_address, node_env, node_ip


def test_each_worker_has_its_own_loopback_address() -> None:
    assert [node_ip(i) for i in (1, 2, 3)] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    with pytest.raises(StackError):
        node_ip(0)


def test_the_loopback_gcs_is_spelled_so_that_ray_keeps_it() -> None:
    assert bootstrap_address("127.0.0.1:6379") == "[::ffff:127.0.0.1]:6379"
    assert bootstrap_address("10.0.0.5:6379") == "10.0.0.5:6379"


def test_command_names_its_node_ports_cpus_and_resource(tmp_path: Path) -> None:
    ports = {
        "node_manager_port": 21001,
        "object_manager_port": 21002,
        "metrics_export_port": 21003,
        "dashboard_agent_listen_port": 21004,
        "dashboard_agent_grpc_port": 21005,
        "runtime_env_agent_port": 21006,
    }
    worker = RayWorker(2, "127.0.0.1:6379", tmp_path / "w.log", num_cpus=1.5, ports=ports)
    cmd = worker.command()
    assert cmd[1:4] == ["start", "--address=[::ffff:127.0.0.1]:6379", "--block"]
    assert "--node-ip-address=127.0.0.3" in cmd
    assert "--num-cpus=1.5" in cmd
    assert "--labels=fleet-node=worker-2" in cmd
    resources = next(a for a in cmd if a.startswith("--resources="))
    assert json.loads(resources.split("=", 1)[1]) == {"fleet_node_2": 1}
    for name, port in ports.items():
        assert f"--{name.replace('_', '-')}={port}" in cmd


def test_state_round_trip_keeps_what_down_needs(tmp_path: Path) -> None:
    worker = RayWorker(1, "127.0.0.1:6379", tmp_path / "w.log", ports={"node_manager_port": 1})
    worker._pid, worker._fingerprint = 4242, "proc:1"
    adopted = RayWorker.from_state(json.loads(json.dumps(worker.state())))
    assert (adopted.pid, adopted.fingerprint, adopted.name) == (4242, "proc:1", "worker-1")
    assert adopted.ports == {"node_manager_port": 1}
    assert not adopted.is_running()  # not that process: never signalled


def test_node_env_swaps_the_s3_variables_and_adds_the_checkout() -> None:
    env = node_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:8333"}, base={"AWS_PROFILE": "x"})
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    assert "AWS_PROFILE" not in env
    assert str(Path(__file__).resolve().parents[3]) in env["PYTHONPATH"].split(":")
