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

Ray versions: written against Ray 2.60's public policy API (`AutoscalingPolicy` with a
class and `policy_kwargs`, `AutoscalingContext.aggregated_metrics`, the replica's
`record_autoscaling_stats`). Ray 2.57, the oldest the project allows, has the same
API, and `.ci/ray-oldest` runs the policy's unit tests on it. Ray's policy API is imported only
when Serve calls the policy, so pools without `autoscale_on_working_set` never need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serve_app.host.working_set import replicas_for_working_set

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

POLICY_PATH = "deployments.autoscaling:WorkingSetPolicy"


class WorkingSetPolicy:
    """Scale a host pool on load (Serve's default policy) and on its working set."""

    def __init__(self, target_fill: float = 0.9) -> None:
        self.target_fill = target_fill

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        # NOTE: imported here, in Serve's controller: importing this module (the builder
        # does) must not need the policy API, which only pools that use it need.
        from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

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
