"""Per-arm counters merge across ingress replicas, counting only replicas on the same split."""

from __future__ import annotations

import json

from serve_app.gateway.arm_stats import ArmStats

SPLIT = {"ab": {"arms": [{"target": "m@1", "weight": 90}, {"target": "m@2", "weight": 10}]}}


def over_the_wire(stats: ArmStats) -> dict:
    """What a peer reads back from the replica directory (JSON in Ray's GCS)."""
    return json.loads(json.dumps(stats.export()))


def test_two_replicas_merge_into_one_report() -> None:
    a, b = ArmStats(SPLIT), ArmStats(SPLIT)
    for _ in range(9):
        a.record("ab", "m@1", "serve", True, 10.0)
    b.record("ab", "m@2", "serve", True, 30.0)
    b.record("ab", "m@2", "serve", False, 0.0)
    b.record("ab", "m@1", "serve", True, 12.0)
    rows = {r["arm"]: r for r in a.snapshot([over_the_wire(b)])}
    assert rows["m@1"]["requests"] == 10
    assert rows["m@2"]["requests"] == 2
    assert rows["m@2"]["errors"] == 1
    assert rows["m@1"]["share"] == round(10 / 12, 4)
    assert abs(rows["m@2"]["p50_ms"] - 30.0) / 30.0 < 0.02  # the peer's latency sketch
    assert {r["arm"]: r["requests"] for r in b.snapshot([over_the_wire(a)])} == {
        "m@1": 10,
        "m@2": 2,
    }  # every replica answers the same


def test_a_peer_still_on_the_old_split_is_left_out() -> None:
    new_split = {"ab": {"arms": [{"target": "m@1", "weight": 50}, {"target": "m@2", "weight": 50}]}}
    updated, lagging = ArmStats(SPLIT), ArmStats(SPLIT)
    updated.record("ab", "m@1", "serve", True, 10.0)
    lagging.record("ab", "m@2", "serve", True, 10.0)
    updated.reset(new_split)  # this replica applied the new split first
    updated.record("ab", "m@2", "serve", True, 10.0)
    rows = updated.snapshot([over_the_wire(lagging)])
    assert [(r["arm"], r["requests"]) for r in rows] == [("m@2", 1)]
    lagging.reset(new_split)
    lagging.record("ab", "m@1", "serve", True, 10.0)
    merged = {r["arm"]: r["requests"] for r in updated.snapshot([over_the_wire(lagging)])}
    assert merged == {"m@1": 1, "m@2": 1}
