"""The working set (bytes of distinct models requested in a window) and the replicas it
needs; the pool policy that takes the larger of that and Serve's load-based decision, run
on a real Serve `AutoscalingContext`."""

from __future__ import annotations

import inspect
from typing import Any

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import POLICY_PATH, WorkingSetPolicy
from serve_app.host.working_set import WorkingSet, replicas_for_working_set

MB = 10**6


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_working_set_counts_distinct_models_in_the_window() -> None:
    clock = Clock()
    ws = WorkingSet(window_s=10, clock=clock)
    for _ in range(3):
        ws.record("a@1", 4 * MB)
    ws.record("b@1", 6 * MB)
    assert ws.bytes() == 10 * MB
    assert len(ws) == 2
    clock.now += 6
    ws.record("a@1", 4 * MB)  # a requested again: stays; b ages out
    clock.now += 5
    assert ws.bytes() == 4 * MB
    assert len(ws) == 1
    clock.now += 11
    assert ws.bytes() == 0


def test_replicas_for_working_set() -> None:
    budgets = [10 * MB, 10 * MB]
    assert replicas_for_working_set([], [], 0.9) == 0  # nobody reported yet
    assert replicas_for_working_set([27 * MB, 0], budgets, 0.9) == 3
    assert replicas_for_working_set([4 * MB, 4 * MB], budgets, 0.9) == 1
    assert replicas_for_working_set([0, 0], budgets, 0.9) == 0


DEPLOYMENT = DeploymentID(name="ModelHost", app_name="fleet")


def context(working_set: list[int], budget: int, ongoing: float) -> AutoscalingContext:
    replicas = [ReplicaID(f"r{i}", DEPLOYMENT) for i in range(len(working_set))]
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=2)
    metrics: dict[str, dict[Any, float]] = {
        "working_set_bytes": dict(zip(replicas, map(float, working_set), strict=True)),
        "budget_bytes": {r: float(budget) for r in replicas},
    }
    # NOTE: Ray 2.57 (the oldest allowed) also requires `total_pending_async_requests`;
    # 2.60 no longer has it. The policy reads neither.
    params = inspect.signature(AutoscalingContext.__init__).parameters
    extra = (
        {"total_pending_async_requests": 0.0} if "total_pending_async_requests" in params else {}
    )
    return AutoscalingContext(
        **extra,  # type: ignore[arg-type]
        deployment_id=DEPLOYMENT,
        deployment_name="ModelHost",
        app_name="fleet",
        current_num_replicas=len(replicas),
        target_num_replicas=len(replicas),
        running_replicas=replicas,
        total_num_requests=ongoing,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=100.0,
        config=config,
    )


def test_policy_scales_on_bytes_when_load_is_light() -> None:
    policy = WorkingSetPolicy(target_fill=0.9)
    decision, state = policy(context([30 * MB], budget=10 * MB, ongoing=1))
    assert decision == 4  # 30 MB over 9 MB a replica (Serve bounds it by max_replicas)
    assert state["replicas_by_bytes"] == 4
    assert state["working_set_bytes"] == 30 * MB


def test_policy_keeps_load_decision_when_bytes_fit() -> None:
    policy = WorkingSetPolicy(target_fill=0.9)
    decision, state = policy(context([2 * MB, 2 * MB], budget=10 * MB, ongoing=4))
    assert state["replicas_by_bytes"] == 1
    assert decision == state["replicas_by_load"]


def test_builder_wires_the_policy_only_with_autoscaling() -> None:
    import pytest
    from ray.serve._private.build_app import build_app as flatten

    from deployments.builder import build_app
    from serve_app.config import AppConfig

    pool = {
        "name": "bytes",
        "memory_budget": "10MB",
        "autoscaling": {"min_replicas": 1, "max_replicas": 3},
        "autoscale_on_working_set": {"window_s": 20, "target_fill": 0.8},
    }
    built = flatten(build_app(AppConfig.model_validate({"pools": [pool]})), name="fleet")
    (deployment,) = [d for d in built.deployments if d.name == "ModelHost-bytes"]
    policy = deployment._deployment_config.autoscaling_config.policy
    assert policy.policy_function == POLICY_PATH
    assert policy.policy_kwargs == {"target_fill": 0.8}
    with pytest.raises(ValueError, match="needs autoscaling"):
        build_app(AppConfig.model_validate({"pools": [{**pool, "autoscaling": None}]}))
