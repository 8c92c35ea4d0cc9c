"""Per-model stats agree with what a client measures; one structured access line per
request; no secrets and no request bodies in any log."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.seaweed import SeaweedServer
from serve_app.storage.store import ModelStore
from tests.integration.reference import rows_for
from tests.support import FleetApp, publish_fresh_models, wait_for

WARM = 30
SECRET_INPUT = "zebra-quartz-unique-input-9f3c"


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, -(-int(q * 1000) * len(ordered) // 1000)) - 1]


@pytest.fixture(scope="module")
def measured(app: FleetApp, store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fresh models (no other test's traffic), each called cold once then WARM times."""
    ids = ["obs-a", "obs-b", "obs-c"]
    publish_fresh_models(app, store, tmp_path_factory.mktemp("obs"), ids, first_index=20)
    client_ms: dict[str, list[float]] = {m: [] for m in ids}
    request_ids: list[str] = []
    transport_ms: list[float] = []
    with httpx.Client(base_url=app.url, timeout=120) as http:
        # the HTTP proxy hop outside the ingress app, measured in this run: a call that
        # does next to nothing inside the app
        for _ in range(40):
            started = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            transport_ms.append((time.perf_counter() - started) * 1000)
        for model_id in ids:
            rows = rows_for(model_id)
            for _ in range(WARM + 1):
                started = time.perf_counter()
                response = http.post(f"/v1/models/{model_id}/predict", json={"inputs": rows})
                client_ms[model_id].append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200
                request_ids.append(response.headers["X-Request-Id"])
            bad = http.post(f"/v1/models/{model_id}/predict", json={"inputs": [[1.0]]})
            assert bad.status_code == 422
    return {
        "ids": ids,
        "client_ms": client_ms,
        "request_ids": request_ids,
        "transport_ms": statistics.median(transport_ms),
    }


def test_stats_agree_with_the_client(app: FleetApp, measured: dict) -> None:
    report = httpx.get(f"{app.url}/v1/stats", params={"window_s": 600}, timeout=30).json()
    rows = {r["model_id"]: r for r in report["models"]}
    for model_id in measured["ids"]:
        row, client = rows[model_id], measured["client_ms"][model_id]
        assert row["version"] == "1"
        assert row["requests"] == WARM + 2  # cold + warm + the 422
        assert row["errors"] == 1
        assert row["cold_starts"] == 1
        assert row["hit_rate"] == pytest.approx(WARM / (WARM + 1), abs=1e-4)
        # the ingress measures from the moment its app gets the request; what the client
        # sees on top is the proxy hop, measured in this run on /healthz
        hop = measured["transport_ms"]
        # (p95 of 31 samples is the 2nd slowest: scheduling noise on 2 cores, looser bound)
        for q, key, rel, slack in ((0.5, "p50_ms", 0.3, 4), (0.95, "p95_ms", 0.5, 10)):
            want = nearest_rank(client, q)
            assert row[key] <= want, (model_id, key, row[key], want)
            assert row[key] + hop == pytest.approx(want, rel=rel, abs=slack), (model_id, key, hop)
        # p99 of 31 samples is the cold request; its load wait is most of it. It is ONE
        # request, and one request's proxy hop on 2 busy cores ranges far past the median
        # hop (a clean-clone CI run saw server 60 ms + hop vs client 83 ms), so the lower
        # bound is loose; the upper bound (the server never overstates) stays exact.
        assert row["p99_ms"] <= max(client)
        assert row["p99_ms"] + hop == pytest.approx(max(client), rel=0.4, abs=20)
        warm = statistics.median(client[1:])
        assert row["warm_p50_ms"] + hop == pytest.approx(warm, rel=0.3, abs=4)
        assert 0 < row["load_p50_ms"] <= row["p99_ms"]
    print(
        f"\nstats vs client: proxy hop {hop:.1f} ms; "
        + "; ".join(
            f"{m}: server p50 {rows[m]['p50_ms']:.1f} ms, client p50 "
            f"{nearest_rank(measured['client_ms'][m], 0.5):.1f} ms"
            for m in measured["ids"]
        )
    )


def test_stats_cli(app: FleetApp, measured: dict) -> None:
    from serve_app.cli import main

    assert main(["--url", app.url, "stats", "--window", "600"]) == 0
    assert main(["--url", app.url, "top", "--iterations", "1", "--interval", "0"]) == 0


def _log_lines(ray_cluster: dict[str, Any]) -> list[str]:
    logs = Path(ray_cluster["session_dir"]) / "logs"
    lines: list[str] = []
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in {".err", ".out", ".log"}:
            lines.extend(path.read_text(errors="replace").splitlines())
    return lines


def test_access_log_line_per_request(
    app: FleetApp, measured: dict, ray_cluster: dict[str, Any]
) -> None:
    wanted = set(measured["request_ids"])

    def access_lines() -> dict[str, dict]:
        found = {}
        for line in _log_lines(ray_cluster):
            start = line.find('{"ts"')
            if start < 0 or '"logger": "serve_app.access"' not in line:
                continue
            entry = json.loads(line[start:])
            if entry.get("request_id") in wanted:
                found[entry["request_id"]] = entry
        return found if len(found) == len(wanted) else {}

    found = wait_for(access_lines, 30, "access log lines for every request", every_s=0.5)
    for entry in found.values():
        assert entry["model_id"] in measured["ids"]
        assert entry["version"] == "1"
        assert entry["status"] == 200
        assert entry["replica"]
        assert isinstance(entry["cold"], bool)
        assert entry["latency_ms"] > 0
        assert "load_wait_ms" in entry
    assert sum(1 for e in found.values() if e["cold"]) == len(measured["ids"])


def test_logs_hold_no_secrets_or_bodies(
    app: FleetApp, s3: SeaweedServer, ray_cluster: dict[str, Any]
) -> None:
    response = app.predict("minilm-embed", [SECRET_INPUT])
    assert response.status_code == 200
    request_id = response.headers["X-Request-Id"]
    wait_for(
        lambda: any(request_id in line for line in _log_lines(ray_cluster)),
        30,
        "the request's access line",
        every_s=0.5,
    )
    text = "\n".join(_log_lines(ray_cluster))
    assert s3.secret_key not in text
    assert SECRET_INPUT not in text
