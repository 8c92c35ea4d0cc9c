"""Replica ranking: which replica of a pool should load a model that no replica holds.

Pure functions over what Serve's router knows of each replica (its id, the model ids it
reports, the routing stats it returns from `record_routing_stats`), shared by the request
router (`deployments/router.py`) and the capacity planner's replay
(`serve_app/planning/replay.py`), so the planner places cold models exactly as the router does.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol, TypeVar


class _HasUniqueId(Protocol):
    @property
    def unique_id(self) -> str: ...


class ReplicaView(Protocol):
    """The fields of Serve's `RunningReplica` that ranking reads."""

    @property
    def replica_id(self) -> _HasUniqueId: ...

    @property
    def multiplexed_model_ids(self) -> Collection[str]: ...

    @property
    def routing_stats(self) -> Mapping[str, Any] | None: ...


R = TypeVar("R", bound=ReplicaView)


def free_bytes(stats: Mapping[str, Any]) -> int | None:
    """Budget not used by resident or reserved (loading) models, from a host's routing
    stats (`ModelHostDeployment.record_routing_stats`); None before its first report."""
    if "budget_bytes" not in stats:
        return None
    return int(
        stats["budget_bytes"] - stats.get("resident_bytes", 0) - stats.get("reserved_bytes", 0)
    )


def rank_for_load(replicas: Sequence[R], model_key: str = "") -> list[R]:
    """Where to load a cold model: most free budget first, then fewest models.

    Free budget counts only once every replica has reported its routing stats (a new
    replica reports within a stats period); until then fewest models decides. Ties break
    by a hash of (model, replica), so concurrent requests for one cold model pick the same
    replica while different models spread.
    """
    frees = [free_bytes(r.routing_stats or {}) for r in replicas]
    known = all(f is not None for f in frees)

    def order(pair: tuple[R, int | None]) -> tuple[int, int, int]:
        replica, free = pair
        tie = zlib.crc32(f"{model_key}|{replica.replica_id.unique_id}".encode())
        return (-(free or 0) if known else 0, len(replica.multiplexed_model_ids), tie)

    return [r for r, _ in sorted(zip(replicas, frees, strict=True), key=order)]
