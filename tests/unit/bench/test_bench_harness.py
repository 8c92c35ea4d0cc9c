"""The bench harness: goals, result files, and `fleetserve bench` discovery (no S3, fast)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import harness
from devstack.cli import bench_labels, bench_names
from serve_app.cli import main


def test_goal_lines_and_result_json(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    result = harness.Result("smoke", runs=3)
    for value in (1.0, 3.0, 2.0):
        result.sample("x_s", value)
    result.finish_medians()
    assert result.medians == {"x_s": 2.0}
    assert result.goal("B0 smoke x", 1.18, "<=", 1.25).passed
    assert not result.goal("B0 smoke y", 0.5, ">=", 0.9).passed
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "B0 smoke x = 1.18 (goal <= 1.25) PASS",
        "B0 smoke y = 0.50 (goal >= 0.9) MISS",
    ]
    path = result.write(str(tmp_path / "smoke.json"))
    body = json.loads(path.read_text())
    assert body["samples"] == {"x_s": [1.0, 3.0, 2.0]}
    assert body["ratios"] == {"B0 smoke x": 1.18, "B0 smoke y": 0.5}
    assert body["machine"]["cpus"] >= 1
    assert harness.load_results(tmp_path)["smoke"]["goals"][1]["pass"] is False


def test_percentile_and_median() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert harness.median(samples) == 50.5
    assert harness.percentile(samples, 99) == 99.0


def test_fleetserve_bench_finds_the_benchmarks_and_rejects_unknown_names(capsys) -> None:  # type: ignore[no-untyped-def]
    root = Path(__file__).resolve().parents[3]
    names = bench_names(root)
    assert {"b1_cold_load", "b2_fetch", "b3_memory", "b6_cold_request", "b8_churn"} <= set(names)
    assert {"b5_policy", "t1_t2_t3_warm_throughput", "warm_overhead", "warm_under_load"} <= set(
        names
    )
    assert not {"harness", "local_stack", "baselines", "load", "process_cpu"} & set(names)
    # NOTE: a goal label picks the benchmark that measures it; a word of a name does not.
    assert [bench_labels(n) for n in ("t1_t2_t3_warm_throughput", "b1_cold_load", "listing")] == [
        ["t1", "t2", "t3"],
        ["b1"],
        [],
    ]
    assert main(["bench", "no-such-bench"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
