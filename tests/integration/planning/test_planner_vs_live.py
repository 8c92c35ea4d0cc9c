"""The capacity planner against the live stack: one Zipf trace, replayed over HTTP on the
session's app (2 host replicas of BUDGET bytes) and through `fleetserve plan`; the planner's
hit rate is within 5 points of the measured one, from the trace and from the ingress's own
access log of the replay.

The trace runs over models published for this test only (no other test's traffic), sized so
that they are about 1.5x the pool's memory; the replicas are emptied first, so the live
pool starts where the planner's does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devstack.demo_fleet import FRAUD_FEATURES, write_fraud_model
from serve_app.api.native import CACHE_HEADER
from serve_app.cli import main
from serve_app.loading.architectures import MlpSpec
from serve_app.planning.replay import replay
from serve_app.planning.trace import (
    read_access_log,
    registry_models,
    trace_from_access_log,
    zipf_trace,
)
from serve_app.storage.publisher import publish_path
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore
from tests.support import BUDGET, FleetApp, wait_for

ROOT = Path(__file__).resolve().parents[3]
MODELS = 30
REQUESTS = 500
ALPHA = 0.8
TOLERANCE = 0.05


def _publish(store: ModelStore, root: Path) -> list[str]:
    """MODELS fresh MLPs of 4-16 MB (about 290 MB: 1.5x the two replicas' budgets)."""
    ids = []
    for i in range(MODELS):
        width = 1000 + (1000 * i) // (MODELS - 1)
        spec = MlpSpec(input_dim=FRAUD_FEATURES, hidden_dims=[width, width], output_dim=1)
        model_id = f"plan-{i:02d}"
        publish_path(store, write_fraud_model(root / model_id, 900 + i, spec=spec), model_id, "1")
        ids.append(model_id)
    return ids


def _empty_the_replicas(app: FleetApp) -> None:
    """Unload (and unpin) whatever earlier tests left resident, so the replay starts cold."""
    for replica in app.replicas():
        for model in replica["models"]:
            model_id, version = model["key"].split("@", 1)
            response = app.manage("POST", f"/v1/models/{model_id}/unload", version=version)
            assert response.status_code == 200, response.text
    wait_for(lambda: all(r["resident_bytes"] == 0 for r in app.replicas()), 30, "empty replicas")


def _access_lines(ray_cluster: dict[str, Any]) -> list[str]:
    logs = Path(ray_cluster["session_dir"]) / "logs"
    lines: list[str] = []
    for path in sorted(logs.rglob("*")):
        if path.is_file() and path.suffix in (".err", ".out", ".log"):
            text = path.read_text(errors="replace")
            if "serve_app.access" in text:
                lines += text.splitlines()
    return lines


def test_planner_hit_rate_is_within_5_points_of_the_live_stack(
    app: FleetApp,
    store: ModelStore,
    store_config: Any,
    ray_cluster: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = _publish(store, tmp_path)
    wait_for(
        lambda: all(
            httpx.get(f"{app.url}/v1/models/{m}", timeout=10).status_code == 200 for m in ids
        ),
        30,
        "the new models in the registry",
    )
    registry = Registry(store)
    registry.refresh()
    models = registry_models(registry.resolve(m) for m in ids)
    trace = zipf_trace(models, ALPHA, REQUESTS, seed=11)
    _empty_the_replicas(app)

    hits = 0
    for request in trace:
        model_id = request.key.split("@")[0]
        response = app.predict(model_id, [[0.1] * FRAUD_FEATURES])
        assert response.status_code == 200, response.text
        hits += response.headers[CACHE_HEADER] == "hit"
    measured = hits / len(trace)

    planned = replay(trace, 2, BUDGET)
    summary = (
        f"\nplanner vs live: {len(trace)} requests over {len(models)} models "
        f"({sum(m[1] for m in models) / 1e6:.0f} MB), 2 replicas x {BUDGET / 1e6:.0f} MB: "
        f"planned hit rate {planned.hit_rate:.3f}, measured {measured:.3f}"
    )
    assert abs(planned.hit_rate - measured) <= TOLERANCE, summary
    assert planned.misses > 0.1 * len(trace)  # a trace that churns, not one that always hits

    # The same replay, as the ingress logged it, through `fleetserve plan --access-log`.
    keys = {m[0] for m in models}

    def logged() -> list[str]:
        lines = _access_lines(ray_cluster)
        events = [e for e in read_access_log(lines) if e.key in keys]
        return lines if len(events) >= len(trace) else []

    lines = wait_for(logged, 30, "the replay's access lines")
    ours = [line for line in lines if '"model_id": "plan-' in line]
    events = read_access_log(ours)
    assert [e.key for e in events] == [r.key for r in trace]
    assert sum(not e.cold for e in events) == hits  # the log says what the headers said
    sizes = {key: nbytes for key, nbytes, _ in models}
    from_log = replay(trace_from_access_log(events, sizes), 2, BUDGET)
    log = tmp_path / "access.log"
    log.write_text("\n".join(ours))
    capsys.readouterr()
    code = main(
        [
            "--config",
            str(ROOT / "config.yaml"),
            "--store-url",
            store_config.url,
            "plan",
            "--access-log",
            str(log),
            "--replicas",
            "2",
            "--budget",
            str(BUDGET),
            "--json",
        ]
    )
    assert code == 0
    (scenario,) = json.loads(capsys.readouterr().out)["scenarios"]
    with capsys.disabled():
        print(summary)
        print(
            f"planner from the access log: {from_log.hit_rate:.3f}; "
            f"`fleetserve plan --access-log`: {scenario['hit_rate']:.3f}, "
            f"{scenario['cold_starts_per_s']} cold starts/s, {scenario['load_seconds']} load s"
        )
    assert abs(from_log.hit_rate - measured) <= TOLERANCE
    assert scenario["hit_rate"] == pytest.approx(from_log.hit_rate, abs=1e-4)
    assert scenario["requests"] == len(trace)

    # The same log on the pools of a config like the session app's (one pool, 2 x BUDGET).
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["applications"][0]["args"]["host"].update(memory_budget=BUDGET, num_replicas=2)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    args = ["--config", str(config_path), "--store-url", store_config.url, "plan"]
    assert main([*args, "--access-log", str(log), "--pools-from-config", "--json"]) == 0
    (pool,) = json.loads(capsys.readouterr().out)["pools"]
    assert (pool["replicas"], pool["budget_bytes"], pool["requests"]) == (2, BUDGET, len(trace))
    assert pool["hit_rate"] == pytest.approx(from_log.hit_rate, abs=1e-4)

    # No traffic yet: a Zipf over every model the registry lists, at their real sizes.
    code = main(
        [
            "--config",
            str(ROOT / "config.yaml"),
            "--store-url",
            store_config.url,
            "plan",
            "--zipf",
            "0.9",
            "--requests",
            "2000",
            "--replicas",
            "1,2",
            "--budget",
            "200MB",
            "--target-hit-rate",
            "0.8",
            "--json",
        ]
    )
    assert code == 0
    zipf = json.loads(capsys.readouterr().out)
    assert zipf["models"] >= MODELS  # the session's fleet and this test's models
    assert [s["replicas"] for s in zipf["scenarios"]] == [1, 2]
    assert zipf["scenarios"][0]["hit_rate"] <= zipf["scenarios"][1]["hit_rate"]
    assert [t["replicas"] for t in zipf["memory_for_target"]] == [1, 2]
