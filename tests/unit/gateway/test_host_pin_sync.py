"""`GET /v1/routing` says whether every host replica took the pins the ingress serves."""

from __future__ import annotations

from serve_app.gateway.gateway import host_pin_sync


def test_hosts_with_the_same_pins_in_any_order_are_in_sync() -> None:
    hosts = [
        {"replica": "a", "pool": "tabular", "routing_pins": ["ranker", "text-clf"]},
        {"replica": "b", "pool": "text", "routing_pins": ["text-clf", "ranker"]},
    ]
    report = host_pin_sync(["ranker", "text-clf"], hosts)
    assert report["in_sync"] is True
    assert [r["in_sync"] for r in report["replicas"]] == [True, True]


def test_a_host_without_the_routing_is_named_out_of_sync() -> None:
    # NOTE: the routing given to the Ingress only: hosts took no user_config at all
    hosts = [
        {"replica": "a", "pool": "tabular", "routing_pins": None},
        {"replica": "b", "pool": "tabular", "routing_pins": ["ranker"]},
    ]
    report = host_pin_sync(["ranker"], hosts)
    assert report["in_sync"] is False
    assert [(r["replica"], r["in_sync"]) for r in report["replicas"]] == [("a", False), ("b", True)]


def test_no_pins_and_hosts_with_an_empty_routing_are_in_sync() -> None:
    assert host_pin_sync([], [{"replica": "a", "pool": "p", "routing_pins": []}])["in_sync"]
    assert host_pin_sync([], [{"replica": "a", "pool": "p", "routing_pins": None}])["in_sync"]
