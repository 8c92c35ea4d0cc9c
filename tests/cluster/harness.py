"""A real multi-node Ray cluster on this machine for the cluster tests: the local stack's
own Ray head (`devstack.ray_head.RayHead`) and worker nodes (`devstack.workers`), all on
loopback addresses with token auth, plus helpers that read the app and the nodes.

The fixtures in conftest.py build it; tests import what they need from here."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devstack.demo_fleet import FRAUD_FEATURES
from devstack.ray_head import RayHead
from devstack.workers import RayWorker, list_nodes
from tests.support import ADMIN

INPUTS = [[0.1 * i for i in range(FRAUD_FEATURES)], [1.0] * FRAUD_FEATURES]


@dataclass
class Cluster:
    """The head and worker nodes started for the session, and how long each took."""

    head: RayHead
    workers: list[RayWorker]
    state_dir: Path
    start_s: dict[str, float] = field(default_factory=dict)

    def alive_nodes(self) -> dict[str, str]:
        """`node_id -> readable name` of every node the head lists alive."""
        out = {}
        for node in list_nodes(self.head.dashboard_url):
            if node.get("state") == "ALIVE":
                name = (node.get("labels") or {}).get("fleet-node") or "head"
                out[str(node["node_id"])] = name
        return out

    def worker(self, name: str) -> RayWorker:
        return next(w for w in self.workers if w.name == name)

    def metrics_urls(self) -> dict[str, str]:
        """Each node's Prometheus endpoint (workers export on their own address)."""
        urls = {"head": f"http://127.0.0.1:{self.head.metrics_export_port}/metrics"}
        for w in self.workers:
            urls[w.name] = f"http://{w.node_ip}:{w.ports['metrics_export_port']}/metrics"
        return urls


@dataclass
class App:
    """The `fleet` app on the cluster, over HTTP."""

    url: str
    # NOTE: the admin key on every call: management (/v1/replicas, pins) fails closed.
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=120, headers=ADMIN))

    def predict(self, model_id: str, timeout_s: float = 120) -> httpx.Response:
        return self.http.post(
            f"{self.url}/v1/models/{model_id}/predict", json={"inputs": INPUTS}, timeout=timeout_s
        )

    def replicas(self) -> list[dict[str, Any]]:
        resp = self.http.get(f"{self.url}/v1/replicas", timeout=30)
        resp.raise_for_status()
        return list(resp.json())


def holders(replicas: Iterable[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The replicas that hold `key` (`model@version`) resident."""
    return [r for r in replicas if any(m["key"] == key for m in r.get("models", []))]


def total_loads(replicas: Iterable[dict[str, Any]]) -> int:
    return sum(int(r.get("loads", 0)) for r in replicas)


def gauge_nodes(text: str, metric: str) -> set[str]:
    """The `node` label values of one metric in a Prometheus exposition."""
    pattern = re.compile(rf"^{re.escape(metric)}\{{([^}}]*)\}}", re.MULTILINE)
    nodes = set()
    for labels in pattern.findall(text):
        found = re.search(r'(?:^|,)node="([^"]*)"', labels)
        if found:
            nodes.add(found.group(1))
    return nodes


def scrape(url: str) -> str:
    try:
        return httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return ""


def since(start: float) -> float:
    return round(time.monotonic() - start, 1)
