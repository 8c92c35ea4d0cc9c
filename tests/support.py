"""Shared test helpers for every tier: polling, the session fleet's shape, small real test
doubles (a fake model, a gated loader, in-process host control) and a client of the app.

Fixtures live in the tiers' conftest.py files and use these; tests import from here, never
from a conftest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devstack.demo_fleet import TEXT_CLASSIFIERS, fraud_model_ids
from serve_app.config import AppConfig
from serve_app.loading.architectures import MlpSpec
from serve_app.storage.store import ModelStore

SMALL = MlpSpec(input_dim=4, hidden_dims=[8], output_dim=1)  # unit tests' tiny MLP
MB = 2**20
BUDGET = 95 * 10**6  # per host replica: minilm-embed (~91 MB) fits, little else beside it
FRAUD_COUNT = 40  # fraud models in the integration session's fleet
CLASSIFIERS = tuple(s for s in TEXT_CLASSIFIERS if s.model_id != "text-clf-toxicity")
# NOTE: management fails closed; the test apps configure this admin key and send it.
ADMIN_KEY = "admin-key-of-the-test-suite"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.1
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


def wait_healthy(url: str, timeout_s: float, what: str) -> None:
    """Poll `GET {url}/healthz` until it answers 200; fail after `timeout_s`."""

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout_s, what, every_s=0.5)


@dataclass
class FleetApp:
    """The running `fleet` app: its HTTP base URL and config (with `ADMIN_KEY`)."""

    url: str
    config: AppConfig

    def manage(self, method: str, path: str, **params: Any) -> httpx.Response:
        """A management call with the admin key."""
        return httpx.request(method, f"{self.url}{path}", params=params, headers=ADMIN, timeout=120)

    def predict(self, model_id: str, inputs: list[Any], **kwargs: Any) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/models/{model_id}/predict",
            json={"inputs": inputs, **kwargs},
            timeout=120,
        )

    def replicas(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/v1/replicas", headers=ADMIN, timeout=30).json()


def publish_fresh_models(
    app: FleetApp, store: ModelStore, root: Path, ids: list[str], first_index: int
) -> None:
    """Publish small fraud-style models under new ids (no other test's traffic), version 1,
    and wait until the app's registry lists them all."""
    from devstack.demo_fleet import write_fraud_model
    from serve_app.storage.publisher import publish_path

    for i, model_id in enumerate(ids):
        publish_path(store, write_fraud_model(root / model_id, first_index + i), model_id, "1")
    wait_for(
        lambda: all(
            httpx.get(f"{app.url}/v1/models/{m}", timeout=10).status_code == 200 for m in ids
        ),
        30,
        "the new models in the registry",
    )


def fraud_ids() -> list[str]:
    return fraud_model_ids(FRAUD_COUNT)


@dataclass
class FakeModel:
    """A 'model' of a given size that records whether it was closed."""

    key: str
    size: int
    closed: bool = False

    @property
    def nbytes(self) -> int:
        return self.size

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeLoader:
    """Builds FakeModels; `gate(key)` makes that key's load wait until released."""

    sizes: dict[str, int]
    calls: list[str] = field(default_factory=list)
    failures: dict[str, Exception] = field(default_factory=dict)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    running: int = 0
    max_running: int = 0
    models: dict[str, FakeModel] = field(default_factory=dict)

    def gate(self, key: str) -> asyncio.Event:
        self.gates[key] = asyncio.Event()
        return self.gates[key]

    def __call__(self, key: str):
        async def load() -> FakeModel:
            self.calls.append(key)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            try:
                if key in self.gates:
                    await self.gates[key].wait()
                else:
                    await asyncio.sleep(0)
                if key in self.failures:
                    raise self.failures[key]
                model = FakeModel(key, self.sizes[key])
                self.models[key] = model
                return model
            finally:
                self.running -= 1

        return load


@dataclass
class LocalHostControl:
    """`HostControl` over in-process `ModelHost`s (real hosts, no Ray), keyed by replica."""

    hosts: dict
    delivered: list = field(default_factory=list)

    def replicas(self) -> list[dict]:
        return [host.status() for host in self.hosts.values()]

    async def command(self, command):
        self.delivered.append((command.replica, command.op, command.key))
        return await self.hosts[command.replica].apply(command)
