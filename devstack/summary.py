"""What `fleetserve up` prints when the stack is up: where everything runs, and a first
request to try with the answer the demo model gave it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from devstack import credentials
from devstack.ray_head import DASHBOARD_URL
from devstack.seaweed import SeaweedServer
from devstack.state import state_path

SAMPLE_MODEL = "minilm-embed"
SAMPLE_INPUTS: list[str] = ["hello world"]


def shorten(value: Any, max_items: int = 4, max_str: int = 80) -> Any:
    """A JSON value cut down for display: long lists and strings are elided."""
    if isinstance(value, list):
        head = [shorten(v, max_items, max_str) for v in value[:max_items]]
        if len(value) > max_items:
            head.append(f"... {len(value) - max_items} more")
        return head
    if isinstance(value, dict):
        return {k: shorten(v, max_items, max_str) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, str) and len(value) > max_str:
        return value[:max_str] + "..."
    return value


def sample_request(serve_url: str, key: str | None = None) -> str:
    """POST one predict call to the demo model (with a tenant's `key`); the shortened
    answer (or the error)."""
    url = f"{serve_url}/v1/models/{SAMPLE_MODEL}/predict"
    headers = {"Authorization": f"Bearer {key}"} if key else None
    try:
        resp = httpx.post(url, json={"inputs": SAMPLE_INPUTS}, headers=headers, timeout=120.0)
    except httpx.HTTPError as exc:
        return f"(request failed: {type(exc).__name__})"
    try:
        body: Any = shorten(resp.json())
    except ValueError:
        body = resp.text[:300]
    return f"HTTP {resp.status_code} {json.dumps(body)}"


def print_summary(
    serve_url: str,
    s3: SeaweedServer,
    state_dir: Path,
    sample: str,
    prometheus_url: str | None = None,
) -> None:
    """Print where everything runs and a first request to try, with its answer."""
    body = json.dumps({"inputs": SAMPLE_INPUTS})
    lines = [
        "",
        "fleetserve is up (everything on 127.0.0.1):",
        f"  API            {serve_url}",
        f"  OpenAPI docs   {serve_url}/docs",
        f"  Ray dashboard  {DASHBOARD_URL}   (token: `ray get-auth-token`)",
        f"  S3 endpoint    {s3.endpoint_url}   (keys in {state_path(state_dir)})",
        f"  Admin key      {state_dir / credentials.ADMIN_KEY_FILE}   (the CLI sends it)",
    ]
    if prometheus_url:
        lines.append(f"  Prometheus     {prometheus_url}   (queries: ops/prometheus/queries.md)")
    lines += [
        "",
        "Try it:",
        f"  curl -s -X POST {serve_url}/v1/models/{SAMPLE_MODEL}/predict \\",
        f"       -H 'content-type: application/json' -d '{body}'",
        f"  -> {sample}",
        "",
        "Stop everything with: fleetserve down",
    ]
    print("\n".join(lines), flush=True)
