"""Many concurrent requests to one model: all succeed, each answer equals the answer the
same input gets alone (tokenizers are shared by the predict threads of a replica)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from devstack.demo_fleet import TEXT_CLASSIFIERS
from tests.integration.reference import assert_same, expected
from tests.support import FleetApp

pytestmark = pytest.mark.integration

CONCURRENT = 64
WORDS = [
    *("the", "parcel", "arrived", "late", "again", "and", "nobody"),
    *("answered", "my", "emails", "about", "the", "refund"),
]


def _texts(n: int) -> list[str]:
    """Texts of many different lengths, so each batch pads and truncates differently."""
    return [" ".join(WORDS[: 1 + i % len(WORDS)] * (1 + i % 5)) + f" #{i}" for i in range(n)]


async def _burst(url: str, model_id: str, texts: list[str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=CONCURRENT)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(f"{url}/v1/models/{model_id}/predict", json={"inputs": [text]})
                for text in texts
            )
        )


@pytest.mark.parametrize("model_id", ["minilm-embed", TEXT_CLASSIFIERS[0].model_id])
def test_concurrent_requests_to_one_text_model(app: FleetApp, model_id: str) -> None:
    texts = _texts(CONCURRENT)
    assert app.predict(model_id, texts[:1]).status_code == 200  # resident before the burst
    responses = asyncio.run(_burst(app.url, model_id, texts))
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * CONCURRENT, [r.text for r in responses if r.status_code != 200][:3]
    got: list[Any] = [r.json()["outputs"][0] for r in responses]
    want = [expected(model_id, [text])[0] for text in texts]
    for g, w in zip(got, want, strict=True):
        assert_same(model_id, [g], [w])
