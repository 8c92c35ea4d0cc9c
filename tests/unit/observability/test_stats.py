"""Stats: sketch accuracy, windows, merging replicas; bounded metric labels."""

from __future__ import annotations

import random

import pytest

from serve_app.observability.metrics import OTHER, ModelLabels
from serve_app.observability.stats import LatencySketch, StatsRecorder, summarise


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(-(-q * len(ordered) // 1)) - 1)]


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_sketch_quantiles_are_within_one_percent(q: float) -> None:
    rng = random.Random(1)
    values = [rng.lognormvariate(2, 1.5) for _ in range(5000)] + [0.2, 20000.0]
    sketch = LatencySketch()
    for v in values:
        sketch.add(v)
    assert sketch.quantile(q) == pytest.approx(exact_quantile(values, q), rel=0.011)


def test_sketches_merge_exactly() -> None:
    a, b, both = LatencySketch(), LatencySketch(), LatencySketch()
    for i in range(1, 200):
        (a if i % 2 else b).add(float(i))
        both.add(float(i))
    a.merge(b)
    assert a.buckets == both.buckets


def test_recorder_rows_count_hits_cold_errors() -> None:
    now = [1000.0]
    rec = StatsRecorder(slice_s=5, clock=lambda: now[0])
    rec.record("m@1", 900.0, ok=True, resident=False, load_wait_ms=850.0)
    for ms in (2.0, 3.0, 4.0):
        rec.record("m@1", ms, ok=True, resident=True)
    rec.record("m@1", 1.0, ok=False)
    [row] = summarise([rec.snapshot()], window_s=60, now=now[0]).models
    assert (row.model_id, row.version) == ("m", "1")
    assert (row.requests, row.errors, row.cold_starts) == (5, 1, 1)
    assert row.hit_rate == 0.75
    assert row.warm_p50_ms == pytest.approx(3.0, rel=0.011)
    assert row.p99_ms == pytest.approx(900.0, rel=0.011)
    assert row.load_p50_ms == pytest.approx(850.0, rel=0.011)


def test_window_excludes_old_slices_and_replicas_merge() -> None:
    now = [1000.0]
    one = StatsRecorder(slice_s=5, clock=lambda: now[0])
    two = StatsRecorder(slice_s=5, clock=lambda: now[0])
    one.record("m@1", 10.0, ok=True, resident=True)
    now[0] = 1100.0
    one.record("m@1", 20.0, ok=True, resident=True)
    two.record("m@1", 30.0, ok=True, resident=True)
    report = summarise([one.snapshot(), two.snapshot()], window_s=30, now=now[0])
    assert report.replicas == 2
    assert report.models[0].requests == 2  # the sample 100 s ago is outside the window
    wide = summarise([one.snapshot(), two.snapshot()], window_s=300, now=now[0])
    assert wide.models[0].requests == 3


def test_model_labels_are_capped() -> None:
    labels = ModelLabels(max_models=2)
    assert labels.tags("a", "1") == {"model": "a", "version": "1"}
    assert labels.tags("b", "1")["model"] == "b"
    assert labels.tags("c", "1") == {"model": OTHER, "version": OTHER}
    assert labels.tags("a", "2") == {"model": "a", "version": "2"}
