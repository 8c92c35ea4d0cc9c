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

    def __init__(
        self, url: str = DEFAULT_URL, timeout_s: float = 300.0, admin_key: str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else None
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)

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

    def replicas(self) -> list[dict[str, Any]]:
        """GET /v1/replicas: what every live model-host replica holds."""
        return self._call("GET", "/v1/replicas")

    def load(self, model_id: str, version: str | None = None, replicas: int = 1) -> dict[str, Any]:
        """POST /v1/models/{model_id}/load on `replicas` replicas."""
        params: dict[str, Any] = {"replicas": replicas}
        if version is not None:
            params["version"] = version
        return self._call("POST", f"/v1/models/{model_id}/load", params=params)

    def unload(self, model_id: str, version: str | None = None) -> dict[str, Any]:
        """POST /v1/models/{model_id}/unload: unpin and evict everywhere."""
        return self._call("POST", f"/v1/models/{model_id}/unload", params=_version(version))

    def pin(self, model_id: str, version: str | None = None) -> dict[str, Any]:
        """PUT /v1/models/{model_id}/pin."""
        return self._call("PUT", f"/v1/models/{model_id}/pin", params=_version(version))

    def unpin(self, model_id: str, version: str | None = None) -> dict[str, Any]:
        """DELETE /v1/models/{model_id}/pin."""
        return self._call("DELETE", f"/v1/models/{model_id}/pin", params=_version(version))

    def close(self) -> None:
        self._http.close()


def _version(version: str | None) -> dict[str, str] | None:
    return None if version is None else {"version": version}


def format_models(
    models: list[dict[str, Any]], replicas: list[dict[str, Any]] | None, now: float
) -> str:
    """Published models joined with where they are resident, as a fixed-width table.

    `replicas` is None when the caller may not see residency (management off or no key).
    """
    where: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for replica in replicas or []:
        for model in replica.get("models", []):
            where.setdefault(model["key"].split("@", 1)[0], []).append((replica["replica"], model))
    header = (
        f"{'model':<28} {'latest':>6} {'task':<24} {'size MB':>8} "
        f"{'resident on (version, MB)':<36} {'pinned':>6} {'used s ago':>10}"
    )
    lines = [header, "-" * len(header)]
    for m in models:
        held = where.get(m["model_id"], [])
        resident = ", ".join(
            f"{r[:8]} v{e['key'].split('@', 1)[1]} {e['bytes'] / 1e6:.1f}" for r, e in held
        )
        if replicas is None:
            resident = "?"
        pinned = "yes" if any(e.get("pinned") for _, e in held) else "-"
        used = [e["last_used"] for _, e in held if e.get("last_used")]
        ago = f"{now - max(used):.0f}" if used else "-"
        lines.append(
            f"{m['model_id'][:28]:<28} {m['latest_version'][:6]:>6} {m['task'][:24]:<24} "
            f"{m['size_bytes'] / 1e6:8.1f} {resident[:36] or '-':<36} {pinned:>6} {ago:>10}"
        )
    live = "?" if replicas is None else str(len(replicas))
    lines.append(f"{len(models)} models, {live} live model-host replica(s)")
    for replica in replicas or []:
        if replica.get("node"):
            lines.append(
                f"  replica {replica['replica'][:8]} on node {replica['node']} "
                f"({replica.get('node_ip', '?')}, id {str(replica.get('node_id', '?'))[:8]})"
            )
    return "\n".join(lines)


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
