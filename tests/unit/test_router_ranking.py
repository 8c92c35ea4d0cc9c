"""Where the router loads a cold model: most free budget first, then fewest models."""

from __future__ import annotations

from types import SimpleNamespace

from deployments.router import ModelAffinityRouter, free_bytes


def _replica(name: str, models: int) -> SimpleNamespace:
    return SimpleNamespace(
        replica_id=SimpleNamespace(unique_id=name),
        multiplexed_model_ids={f"m{i}@1" for i in range(models)},
    )


def _rank(free: dict[str, int], replicas: list[SimpleNamespace]) -> list[str]:
    view = SimpleNamespace(free=free)
    router = SimpleNamespace(_budget_view=lambda: view)
    ranked = ModelAffinityRouter.rank_for_load(router, replicas)  # type: ignore[arg-type]
    return [r.replica_id.unique_id for r in ranked]


def test_most_free_budget_first_even_with_more_models() -> None:
    replicas = [_replica("a", 1), _replica("b", 5), _replica("c", 0)]
    assert _rank({"a": 10, "b": 500, "c": 200}, replicas) == ["b", "c", "a"]


def test_without_a_budget_view_fewest_models_first() -> None:
    replicas = [_replica("a", 3), _replica("b", 1), _replica("c", 2)]
    assert _rank({}, replicas) == ["b", "c", "a"]


def test_free_bytes_counts_resident_and_reserved() -> None:
    status = {"budget_bytes": 100, "resident_bytes": 30, "reserved_bytes": 25}
    assert free_bytes(status) == 45
