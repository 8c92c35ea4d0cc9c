"""A grouped call on a real host: all models' forward passes in one job, one bad request
getting its own error while the others of its model get their outputs, leases released."""

from __future__ import annotations

from pathlib import Path

from serve_app.config import BatchingConfig, HostConfig
from serve_app.errors import NotResidentHere
from serve_app.host.groups import batches_of, predict_group
from serve_app.host.model_host import ModelHost
from serve_app.schemas import BatchResult, PredictBatch, ReplicaBatch
from serve_app.storage.store import ModelStore
from tests.support import MB

ROW = [0.5, -1.0, 0.25, 2.0]


async def test_a_bad_request_fails_alone_and_the_group_matches_single_calls(
    host: ModelHost, published: ModelStore
) -> None:
    a, b = published.read_manifest("m-a", "1"), published.read_manifest("m-b", "1")
    alone_a = await host.predict_batch(PredictBatch(a, [[ROW]], ["a0"]))
    alone_b = await host.predict_batch(PredictBatch(b, [[ROW, ROW]], ["b0"]))
    before = host.batcher.stats.batches
    group = ReplicaBatch(
        [
            PredictBatch(a, [[ROW], [[1.0, 2.0]], [ROW]], ["a1", "bad", "a2"]),
            PredictBatch(b, [[ROW, ROW]], ["b1"]),
        ],
        "unit",
    )
    results = await predict_group(host, group)
    first, second = results
    assert isinstance(first, BatchResult)
    assert isinstance(second, BatchResult)
    assert first.outputs[0] == alone_a.outputs[0]
    assert first.outputs[2] == alone_a.outputs[0]
    assert isinstance(first.outputs[1], Exception)  # its own error: 2 features, not 4
    assert second.outputs == alone_b.outputs
    assert host.batcher.stats.batches == before + 2  # one forward job per model, counted
    assert all(e.leases == 0 for e in host.cache.entries())  # every lease released


async def test_a_model_no_longer_resident_is_handed_back_not_loaded_in_the_group(
    host: ModelHost, published: ModelStore
) -> None:
    """Loading it inside the group would hold the other models' requests for the load."""
    a, b = published.read_manifest("m-a", "1"), published.read_manifest("m-b", "1")
    await host.predict_batch(PredictBatch(a, [[ROW]], ["warm"]))
    results = await predict_group(
        host,
        ReplicaBatch([PredictBatch(b, [[ROW]], ["b"]), PredictBatch(a, [[ROW]], ["a"])], "u"),
    )
    assert isinstance(results[0], NotResidentHere)
    assert b.key not in host.cache  # not loaded: the ingress resends it per model
    assert isinstance(results[1], BatchResult)
    assert results[1].response(a, 0).model_id == "m-a"


def test_a_models_requests_run_in_batches_of_at_most_its_max_batch_size() -> None:
    requests = [[[1.0]] * n for n in (2, 1, 3, 5, 1, 1)]
    assert [[len(r) for r in chunk] for chunk in batches_of(requests, 4)] == [
        [2, 1],
        [3],
        [5],  # bigger than the limit: alone
        [1, 1],
    ]


async def test_a_group_keeps_each_models_max_batch_size(
    published: ModelStore, tmp_path: Path
) -> None:
    config = HostConfig(
        memory_budget=MB,
        disk_cache_dir=str(tmp_path / "disk"),
        accelerator="cpu",
        batching=BatchingConfig(max_batch_size=2),
    )
    host = ModelHost(config, published, replica="unit")
    a = published.read_manifest("m-a", "1")
    await host.predict_batch(PredictBatch(a, [[ROW]], ["warm"]))
    before = host.batcher.stats.batches
    (result,) = await predict_group(
        host, ReplicaBatch([PredictBatch(a, [[ROW]] * 5, [f"r{i}" for i in range(5)])], "u")
    )
    assert isinstance(result, BatchResult)
    assert len(result.outputs) == 5
    assert host.batcher.stats.batches == before + 3  # 2 + 2 + 1 rows
    assert host.batcher.stats.largest_batch <= 2
    await host.close()
