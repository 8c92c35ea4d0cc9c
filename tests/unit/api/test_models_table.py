"""`fleetserve models`: the table names where each model is resident and each replica's node."""

from __future__ import annotations

from serve_app.api.client import format_models

MODELS = [{"model_id": "m", "latest_version": "1", "task": "t", "size_bytes": 2_000_000}]
ENTRY = {"key": "m@1", "bytes": 2_000_000, "last_used": 90.0, "pinned": False}


def test_each_replica_is_named_with_its_node() -> None:
    replicas = [
        {"replica": "abcdefgh12", "node": "worker-1", "node_ip": "127.0.0.2",
         "node_id": "0123456789ab", "models": [ENTRY]},
        {"replica": "ijklmnop34", "node": "head", "node_ip": "127.0.0.1",
         "node_id": "fedcba987654", "models": []},
    ]  # fmt: skip
    table = format_models(MODELS, replicas, now=100.0)
    row = next(line for line in table.splitlines() if line.startswith("m "))
    assert "abcdefgh v1 2.0" in row
    assert "replica abcdefgh on node worker-1 (127.0.0.2, id 01234567)" in table
    assert "replica ijklmnop on node head (127.0.0.1, id fedcba98)" in table


def test_replicas_without_a_node_get_no_node_line() -> None:
    table = format_models(MODELS, [{"replica": "abcdefgh12", "models": [ENTRY]}], now=100.0)
    assert " on node " not in table
