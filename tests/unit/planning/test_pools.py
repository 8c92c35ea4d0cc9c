"""`fleetserve plan --pools-from-config`: the trace split over a config's pools by the
ingress's own placement rules, each share replayed on that pool's replicas and budget."""

from __future__ import annotations

import pytest

from serve_app.config import AppConfig
from serve_app.gateway.placement import Placement
from serve_app.planning.pools import (
    format_pools,
    overall_hit_rate,
    pool_replicas,
    replay_config,
    routing_of,
    split_by_pool,
)
from serve_app.planning.replay import replay
from serve_app.planning.trace import TraceRequest, zipf_trace
from serve_app.storage.manifest import Manifest

MB = 10**6


def manifest(model_id: str, nbytes: int, tags: list[str] | None = None) -> Manifest:
    return Manifest.model_validate(
        {
            "model_id": model_id,
            "version": "1",
            "format": "torch-module",
            "task": "tabular-classification",
            "files": [{"path": "model.safetensors", "size": nbytes, "sha256": "0" * 64}],
            "created_at": "2026-01-01T00:00:00+00:00",
            "tags": tags or [],
        }
    )


MANIFESTS = {
    m.key: m
    for m in [
        *(manifest(f"fraud-{i:02d}", (1 + i % 5) * MB) for i in range(20)),
        *(manifest(f"text-{i}", 20 * MB) for i in range(4)),
        manifest("ranker", 10 * MB, tags=["gpu"]),
    ]
}
TRACE = zipf_trace([(k, m.weight_bytes, 0.5) for k, m in MANIFESTS.items()], 0.8, 3000, 2, 10)
SERVE_CONFIG = {
    "applications": [
        {
            "name": "fleet",
            "args": {
                "pools": [
                    {"name": "tabular", "num_replicas": 2, "memory_budget": "12MB"},
                    {"name": "text", "memory_budget": "50MB", "eviction_policy": "gdsf",
                     "autoscaling": {"min_replicas": 1, "max_replicas": 3}},
                ]
            },
            "deployments": [
                {
                    "name": "Ingress",
                    "user_config": {
                        "rules": [
                            {"pattern": "text-*", "pool": "text"},
                            {"tag": "gpu", "pool": "text"},
                        ]
                    },
                }
            ],
        }
    ]
}  # fmt: skip


def test_requests_go_to_the_pool_the_ingress_rules_name() -> None:
    routing = routing_of(SERVE_CONFIG)
    shares = split_by_pool(TRACE, Placement(routing.rules, ["tabular", "text"]), MANIFESTS)
    assert {r.key.split("-")[0] for r in shares["tabular"]} == {"fraud"}
    assert {r.key for r in shares["text"]} <= {*(f"text-{i}@1" for i in range(4)), "ranker@1"}
    assert "ranker@1" in {r.key for r in shares["text"]}  # by tag
    assert len(shares["tabular"]) + len(shares["text"]) == len(TRACE)


def test_each_pool_replays_with_its_own_replicas_budget_and_policy() -> None:
    config = AppConfig.model_validate(SERVE_CONFIG["applications"][0]["args"])
    pool_plans = replay_config(TRACE, config, routing_of(SERVE_CONFIG), MANIFESTS)
    plans = {p.pool: p.result for p in pool_plans}
    assert (plans["tabular"].replicas, plans["tabular"].budget_bytes) == (2, 12 * MB)
    assert (plans["text"].replicas, plans["text"].budget_bytes, plans["text"].policy) == (
        3,
        50 * MB,
        "gdsf",
    )
    text_share = [r for r in TRACE if r.key.startswith(("text-", "ranker"))]
    assert plans["text"].hits == replay(text_share, 3, 50 * MB, "gdsf").hits
    total = sum(p.requests for p in plans.values())
    assert overall_hit_rate(pool_plans) == pytest.approx(
        sum(p.hits for p in plans.values()) / total
    )
    assert "overall hit rate" in format_pools(pool_plans)


def test_a_gpu_pool_without_a_budget_needs_one_given() -> None:
    args = {"pools": [{"name": "gpu", "accelerator": "cuda"}]}
    config = AppConfig.model_validate(args)
    routing = routing_of({"applications": [{"name": "fleet", "args": args}]})
    trace = [TraceRequest("ranker@1", 10 * MB, 1.0)]
    with pytest.raises(ValueError, match="--budget"):
        replay_config(trace, config, routing, MANIFESTS)
    (plan,) = replay_config(trace, config, routing, MANIFESTS, budget_bytes=16 * MB)
    assert plan.result.budget_bytes == 16 * MB
    assert pool_replicas(config.pool_configs()[0]) == 2
