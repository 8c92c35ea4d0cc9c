"""Per-model dynamic batching: the batcher's rules, and a real host batching real models."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from serve_app.config import BatchingConfig, BatchPolicyConfig, HostConfig
from serve_app.errors import InvalidInput
from serve_app.host.batching import BatchPolicy, MicroBatcher
from serve_app.host.model_host import ModelHost
from serve_app.schemas import PredictBatch, PredictCall
from serve_app.storage.manifest import Manifest
from serve_app.storage.store import ModelStore
from tests.support import MB


class Recorder:
    """A `run` that records each batch and answers item * 10; gated to build queues."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_on: set[int] = set()

    async def run(self, key: str, items: list[int]) -> list[int]:
        self.batches.append((key, list(items)))
        await self.gate.wait()
        if self.fail_on.intersection(items):
            raise InvalidInput(f"bad item in {items}")
        return [i * 10 for i in items]


async def test_concurrent_items_of_one_key_batch_and_keys_never_mix() -> None:
    rec = Recorder()
    batcher: MicroBatcher[str, int, int] = MicroBatcher(rec.run, lambda k: BatchPolicy(8))
    rec.gate.clear()
    first = asyncio.create_task(batcher.submit("a", 0))
    await asyncio.sleep(0)  # the first batch starts alone and holds the gate
    tasks = [asyncio.create_task(batcher.submit(k, i)) for i in range(1, 6) for k in ("a", "b")]
    await asyncio.sleep(0.01)
    rec.gate.set()
    results = await asyncio.gather(first, *tasks)
    assert results == [0] + [i * 10 for i in range(1, 6) for _ in ("a", "b")]
    for key, items in rec.batches:
        assert all(isinstance(i, int) for i in items)
        expected = {"a": set(range(6)), "b": set(range(1, 6))}[key]
        assert set(items) <= expected
    a_batches = [items for key, items in rec.batches if key == "a"]
    assert a_batches[0] == [0]
    assert a_batches[1] == [1, 2, 3, 4, 5]  # queued behind the running batch: one batch
    assert batcher.queued("a") == 0


async def test_max_batch_size_counts_rows_and_a_big_item_runs_alone() -> None:
    rec = Recorder()
    batcher: MicroBatcher[str, int, int] = MicroBatcher(rec.run, lambda k: BatchPolicy(4))
    rec.gate.clear()
    first = asyncio.create_task(batcher.submit("a", 0, rows=1))
    await asyncio.sleep(0)
    sizes = {1: 2, 2: 2, 3: 1, 4: 9, 5: 1}
    tasks = [asyncio.create_task(batcher.submit("a", i, rows=n)) for i, n in sizes.items()]
    await asyncio.sleep(0.01)
    rec.gate.set()
    await asyncio.gather(first, *tasks)
    assert [items for _, items in rec.batches] == [[0], [1, 2], [3], [4], [5]]


async def test_max_wait_collects_items_arriving_later() -> None:
    rec = Recorder()
    policy = BatchPolicy(max_batch_size=3, max_wait_ms=200)
    batcher: MicroBatcher[str, int, int] = MicroBatcher(rec.run, lambda k: policy)

    async def later(i: int) -> int:
        await asyncio.sleep(0.02 * i)
        return await batcher.submit("a", i)

    assert await asyncio.gather(*(later(i) for i in range(3))) == [0, 10, 20]
    assert [items for _, items in rec.batches] == [[0, 1, 2]]  # full before the wait ended


async def test_zero_wait_runs_a_lone_item_at_once() -> None:
    rec = Recorder()
    batcher: MicroBatcher[str, int, int] = MicroBatcher(rec.run, lambda k: BatchPolicy(32))
    started = asyncio.get_running_loop().time()
    assert await batcher.submit("a", 7) == 70
    assert asyncio.get_running_loop().time() - started < 0.05


async def test_a_failing_item_fails_alone() -> None:
    rec = Recorder()
    rec.fail_on = {3}
    batcher: MicroBatcher[str, int, int] = MicroBatcher(rec.run, lambda k: BatchPolicy(8))
    rec.gate.clear()
    first = asyncio.create_task(batcher.submit("a", 0))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(batcher.submit("a", i)) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    rec.gate.set()
    results = await asyncio.gather(first, *tasks, return_exceptions=True)
    assert isinstance(results[3], InvalidInput)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 10, 20, 40, 50]
    assert batcher.stats.split_retries == 1


async def test_a_cancelled_caller_is_skipped_and_others_are_served() -> None:
    rec = Recorder()
    batcher: MicroBatcher[str, int, int] = MicroBatcher(rec.run, lambda k: BatchPolicy(8))
    rec.gate.clear()
    first = asyncio.create_task(batcher.submit("a", 0))
    await asyncio.sleep(0)
    gone = asyncio.create_task(batcher.submit("a", 1))
    kept = asyncio.create_task(batcher.submit("a", 2))
    await asyncio.sleep(0.01)
    gone.cancel()
    rec.gate.set()
    assert await first == 0
    assert await kept == 20
    assert [items for _, items in rec.batches] == [[0], [2]]


async def test_in_flight_limit_per_key() -> None:
    running = 0
    peak = 0

    async def run(key: str, items: list[int]) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return items

    batcher: MicroBatcher[str, int, int] = MicroBatcher(run, lambda k: BatchPolicy(2, 0, 2))
    assert await asyncio.gather(*(batcher.submit("a", i) for i in range(10))) == list(range(10))
    assert peak == 2


def test_per_model_policy_overrides_the_defaults() -> None:
    config = BatchingConfig(
        max_batch_size=16, max_wait_ms=2, models={"slow": BatchPolicyConfig(max_batch_size=1)}
    )
    assert config.for_model("slow").max_batch_size == 1
    assert config.for_model("other") == BatchPolicyConfig(max_batch_size=16, max_wait_ms=2)
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchPolicyConfig(max_batch_size=0)


# --------------------------------------------------------------------------- real host


def _host(published: ModelStore, tmp_path: Path, max_batch_size: int) -> ModelHost:
    config = HostConfig(
        memory_budget=MB,
        disk_cache_dir=str(tmp_path / f"disk-{max_batch_size}"),
        accelerator="cpu",
        batching=BatchingConfig(max_batch_size=max_batch_size),
    )
    return ModelHost(config, published, replica="unit")


def _rows(seed: int, n: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.uniform(-2, 2) for _ in range(4)] for _ in range(n)]


async def test_host_batches_concurrent_requests_with_unbatched_outputs(
    published: ModelStore, tmp_path: Path
) -> None:
    manifest: Manifest = published.read_manifest("m-a", "1")
    requests = [_rows(i, 1 + i % 3) for i in range(24)]
    plain = _host(published, tmp_path, max_batch_size=1)
    expected = [
        (await plain.predict(PredictCall(manifest=manifest, inputs=r, request_id=str(i)))).outputs
        for i, r in enumerate(requests)
    ]
    assert plain.batcher.stats.batches == 0  # batching off: no batcher at all

    host = _host(published, tmp_path, max_batch_size=16)
    # the other model's requests run at the same time and must never join these batches
    other = published.read_manifest("m-b", "1")
    calls = [
        PredictCall(manifest=manifest, inputs=r, request_id=str(i)) for i, r in enumerate(requests)
    ]
    others = [
        PredictCall(manifest=other, inputs=r, request_id=f"b{i}") for i, r in enumerate(requests)
    ]
    results = await asyncio.gather(*(host.predict(c) for c in [*calls, *others]))
    got = [r.outputs for r in results[: len(calls)]]
    for want, have in zip(expected, got, strict=True):
        assert have == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert {r.model_id for r in results[len(calls) :]} == {"m-b"}
    stats = host.batcher.stats
    assert stats.largest_batch > 1
    assert stats.batches < stats.items
    await plain.close()
    await host.close()


async def test_host_batch_call_returns_each_requests_outcome(
    published: ModelStore, tmp_path: Path
) -> None:
    host = _host(published, tmp_path, max_batch_size=32)
    manifest = published.read_manifest("m-a", "1")
    batch = PredictBatch(manifest, [_rows(1, 2), _rows(2, 1)], ["r1", "r2"])
    result = await host.predict_batch(batch)
    assert [len(o) for o in result.outputs] == [2, 1]  # type: ignore[arg-type]
    assert result.response(manifest, 1).model_id == "m-a"
    await host.close()


async def test_a_lone_item_runs_in_its_callers_task() -> None:
    tasks: list[asyncio.Task[object] | None] = []

    async def run(key: str, items: list[int]) -> list[int]:
        tasks.append(asyncio.current_task())
        return items

    batcher: MicroBatcher[str, int, int] = MicroBatcher(run, lambda k: BatchPolicy(8))
    assert await batcher.submit("a", 1) == 1
    assert tasks == [asyncio.current_task()]  # no hand-off to a batch task
    assert batcher.queued("a") == 0
