"""Baseline Serve apps the fleet is compared against, built from the same model code.

- `plain_app`: the ordinary single-model Serve deployment: a FastAPI ingress deployment that
  loads one model version at start (with fleetserve's own loader, so the model and its
  `predict` are identical) and answers `POST /` with `{"inputs": ...}` -> `{"outputs": ...}`.
  One hop: Serve proxy -> replica.
- `multiplexed_app`: Ray Serve's built-in model multiplexing (`@serve.multiplexed`,
  count-based LRU per replica), loading any published model by id on demand; the model id
  comes in Serve's `serve_multiplexed_model_id` header. Also one hop.

Both run their predictions in a worker thread, as the fleet's host does, with torch limited
to one intra-op thread.
"""

# NOTE: no `from __future__ import annotations`: FastAPI must see the real `Request`
# annotation of the routes defined inside the builders.
import asyncio
from typing import Any

from fastapi import FastAPI, Request

from serve_app.config import StoreConfig


def _loader(config: StoreConfig) -> Any:
    import tempfile
    from pathlib import Path

    import torch

    from serve_app.loading.disk_tier import DiskTier
    from serve_app.loading.loader import ModelLoader
    from serve_app.storage.store import ModelStore

    torch.set_num_threads(1)
    store = ModelStore(config)
    return store, ModelLoader(store, DiskTier(Path(tempfile.mkdtemp()), 2**31), torch.device("cpu"))


def plain_app(
    config: StoreConfig, model_id: str, version: str, num_replicas: int, num_cpus: float
) -> Any:
    """A single-model Serve app holding `model_id@version` (see module docstring)."""
    from ray import serve

    api = FastAPI()

    @serve.deployment(
        name="Plain",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=16,
    )
    @serve.ingress(api)
    class Plain:
        def __init__(self, config: StoreConfig) -> None:
            store, loader = _loader(config)
            self.model = loader.load(store.read_manifest(model_id, version))

        @api.post("/")
        async def predict(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            return {"outputs": await asyncio.to_thread(self.model.predict, body["inputs"])}

    return Plain.bind(config)


def multiplexed_app(
    config: StoreConfig, num_replicas: int, num_cpus: float, models_per_replica: int = 3
) -> Any:
    """Ray Serve's `@serve.multiplexed` over the same store and loader (see module docstring)."""
    from ray import serve

    api = FastAPI()

    @serve.deployment(
        name="Multiplexed",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=16,
    )
    @serve.ingress(api)
    class Multiplexed:
        def __init__(self, config: StoreConfig) -> None:
            self.store, self.loader = _loader(config)

        @serve.multiplexed(max_num_models_per_replica=models_per_replica)
        async def get_model(self, key: str) -> Any:
            model_id, version = key.split("@", 1)
            manifest = self.store.read_manifest(model_id, version)
            return await asyncio.to_thread(self.loader.load, manifest)

        @api.post("/")
        async def predict(self, request: Request) -> dict[str, Any]:
            model = await self.get_model(serve.get_multiplexed_model_id())
            body = await request.json()
            return {"outputs": await asyncio.to_thread(model.predict, body["inputs"])}

    return Multiplexed.bind(config)
