"""The working-set autoscaling policy of a host pool, through Serve's custom policy hook.

`build_app` sets it as the pool's `autoscaling_config.policy`
(`{"policy_function": "deployments.autoscaling:WorkingSetPolicy", "policy_kwargs": ...}`)
when the pool has `autoscale_on_working_set`. Serve's controller instantiates the class once
and calls it every control-loop tick with an `AutoscalingContext`, whose
`aggregated_metrics` hold what each replica returned from `record_autoscaling_stats`
(`deployments/model_host.py`: its working-set bytes and budget, averaged by Serve over
`look_back_period_s`).

The decision is the larger of Serve's own default (ongoing requests against
`target_ongoing_requests`, with its upscale/downscale delays) and the replicas the working
set needs (`serve_app.host.working_set.replicas_for_working_set`); Serve bounds it by
min/max_replicas. The working set is already a window (`window_s`), so shrinking it
scales down once its window has passed.
"""

from __future__ import annotations

from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

from serve_app.host.working_set import replicas_for_working_set

POLICY_PATH = "deployments.autoscaling:WorkingSetPolicy"


class WorkingSetPolicy:
    """Scale a host pool on load (Serve's default policy) and on its working set."""

    def __init__(self, target_fill: float = 0.9) -> None:
        self.target_fill = target_fill

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        by_load, state = replica_queue_length_autoscaling_policy(ctx)
        metrics = ctx.aggregated_metrics or {}
        working_set = metrics.get("working_set_bytes", {})
        by_bytes = replicas_for_working_set(
            working_set.values(), metrics.get("budget_bytes", {}).values(), self.target_fill
        )
        # NOTE: the policy state is Serve's to keep between ticks; ours rides along so the
        # controller's logs and tests can see why it decided.
        state = {
            **state,
            "working_set_bytes": sum(working_set.values()),
            "replicas_by_load": by_load,
            "replicas_by_bytes": by_bytes,
        }
        return max(int(by_load), by_bytes), state
