"""A small HTTP client of a running fleet, shared by the CLI and the notebooks."""

from __future__ import annotations

from typing import Any

import httpx

from serve_app.errors import FleetError

DEFAULT_URL = "http://127.0.0.1:8000"


class FleetClientError(FleetError):
    """The fleet answered with an error (its status and code are kept)."""

    code = "client_error"


class FleetClient:
    """Calls the fleet's HTTP API (predict, models, stats)."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        body = response.json()
        if response.status_code >= 400:
            raise FleetClientError(
                f"{response.status_code} {body.get('code')}: {body.get('error')}"
            )
        return body

    def predict(
        self, model_id: str, inputs: list[Any], version: str | None = None
    ) -> dict[str, Any]:
        """POST /v1/models/{model_id}/predict."""
        payload: dict[str, Any] = {"inputs": inputs}
        if version is not None:
            payload["version"] = version
        return self._call("POST", f"/v1/models/{model_id}/predict", json=payload)

    def models(self) -> list[dict[str, Any]]:
        """GET /v1/models."""
        return self._call("GET", "/v1/models")["models"]

    def describe(self, model_id: str) -> dict[str, Any]:
        """GET /v1/models/{model_id}: the manifest of the latest version."""
        return self._call("GET", f"/v1/models/{model_id}")

    def stats(self, window_s: float | None = None) -> dict[str, Any]:
        """GET /v1/stats."""
        params = {"window_s": window_s} if window_s else None
        return self._call("GET", "/v1/stats", params=params)

    def close(self) -> None:
        self._http.close()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_stats(report: dict[str, Any], limit: int | None = None) -> str:
    """The stats report as a fixed-width table, busiest models first."""
    rows = sorted(report["models"], key=lambda r: -r["requests"])[:limit]
    header = (
        f"{'model':<28} {'ver':>4} {'reqs':>6} {'err':>4} {'hit%':>6} {'cold':>5} "
        f"{'p50':>8} {'p95':>8} {'p99':>8} {'warm50':>8} {'warm99':>8} {'load50':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        hit = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}"
        lines.append(
            f"{r['model_id'][:28]:<28} {r['version'][:4]:>4} {r['requests']:>6} {r['errors']:>4} "
            f"{hit:>6} {r['cold_starts']:>5} {_ms(r['p50_ms']):>8} {_ms(r['p95_ms']):>8} "
            f"{_ms(r['p99_ms']):>8} {_ms(r['warm_p50_ms']):>8} {_ms(r['warm_p99_ms']):>8} "
            f"{_ms(r['load_p50_ms']):>8}"
        )
    lines.append(
        f"{len(report['models'])} models, window {report['window_s']:.0f}s, "
        f"{report['replicas']} ingress replica(s); latencies in ms"
    )
    return "\n".join(lines)
