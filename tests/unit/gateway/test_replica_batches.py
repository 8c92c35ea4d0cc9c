"""Grouping calls by replica: one batch per model in order of arrival, and each call's
answer back from its model's result: outputs, its own error, or its model's error."""

from __future__ import annotations

import pytest

from serve_app.errors import InvalidInput, ModelLoadFailed
from serve_app.gateway.replica_batches import group, outcomes
from serve_app.schemas import BatchResult, PredictCall, PredictResponse
from serve_app.storage.manifest import Manifest


def manifest(model_id: str) -> Manifest:
    return Manifest.model_validate(
        {
            "model_id": model_id,
            "version": "1",
            "format": "torch-module",
            "task": "tabular-classification",
            "files": [{"path": "model.safetensors", "size": 8, "sha256": "0" * 64}],
            "created_at": "2026-01-01T00:00:00+00:00",
        }
    )


def call(model_id: str, n: int) -> PredictCall:
    return PredictCall(manifest=manifest(model_id), inputs=[[float(n)]], request_id=f"r{n}")


def test_calls_are_grouped_per_model_and_answered_in_their_own_slot() -> None:
    calls = [call("a", 0), call("b", 1), call("a", 2), call("c", 3), call("b", 4)]
    batch, places = group(calls, "replica-1")
    assert batch.replica == "replica-1"
    assert batch.model_key == "a@1"
    assert [b.manifest.model_id for b in batch.batches] == ["a", "b", "c"]
    assert [b.request_ids for b in batch.batches] == [["r0", "r2"], ["r1", "r4"], ["r3"]]
    assert batch.batches[0].inputs == [[[0.0]], [[2.0]]]

    bad_row = InvalidInput("row 0 has 2 features, expected 1")
    results: list[BatchResult | BaseException] = [
        BatchResult([[10.0], bad_row], resident=True, load_wait_ms=0.0, replica="replica-1"),
        ModelLoadFailed("b@1: weights do not match the manifest"),
        BatchResult([[13.0]], resident=False, load_wait_ms=5.0, replica="replica-1"),
    ]
    answers = outcomes(batch, places, results)
    assert isinstance(answers[0], PredictResponse)
    assert (answers[0].model_id, answers[0].outputs) == ("a", [10.0])
    assert answers[2] is bad_row  # its own error, not its model's
    assert answers[1] is results[1]  # b's load failed: both of b's calls get it
    assert answers[4] is results[1]
    assert isinstance(answers[3], PredictResponse)
    assert answers[3].outputs == [13.0]
    assert (answers[3].resident, answers[3].load_wait_ms) == (False, 5.0)


def test_a_short_answer_is_an_error_not_a_misattribution() -> None:
    batch, places = group([call("a", 0), call("b", 1)], "r")
    with pytest.raises(RuntimeError, match="2 batches got 1 results"):
        outcomes(batch, places, [ModelLoadFailed("a@1")])
