"""The model host's Ray glue without Ray running: the push of a replica's model ids to
Serve's controller (whose first call may look the controller up in the GCS) runs off the
event loop, in order (issue 15 item 5); a call grouping several models answers each."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

import deployments.model_host as model_host_module
from deployments.model_host import ModelHostDeployment
from serve_app.errors import NotResidentHere
from serve_app.host.model_host import ModelHost
from serve_app.host.working_set import WorkingSet
from serve_app.schemas import BatchResult, PredictBatch, ReplicaBatch
from serve_app.storage.store import ModelStore


class _BareHost(ModelHostDeployment.func_or_class):  # type: ignore[misc,name-defined]
    """The deployment class built with object.__new__ (no replica context), without its
    async __del__."""

    def __del__(self) -> None:
        pass


async def test_model_ids_are_pushed_off_the_event_loop_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pushes: list[tuple[threading.Thread, list[str]]] = []

    def push_model_ids(replica_id: object, keys: list[str]) -> None:
        pushes.append((threading.current_thread(), list(keys)))

    monkeypatch.setattr(model_host_module, "push_model_ids", push_model_ids)
    host = object.__new__(_BareHost)
    host._replica_id = "r1"
    host._push_thread = ThreadPoolExecutor(1, "model-ids")
    host._closing = False
    try:
        for keys in (["a@1"], ["a@1", "b@1"], ["b@1"]):
            host._push_routing_info(keys)
        await asyncio.to_thread(host._push_thread.shutdown, wait=True)
    finally:
        host._push_thread.shutdown(wait=False)
    assert [keys for _, keys in pushes] == [["a@1"], ["a@1", "b@1"], ["b@1"]]
    assert threading.current_thread() not in {thread for thread, _ in pushes}


def test_a_closing_replica_pushes_nothing_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evictions during shutdown still reach the coalescer; once the replica is closing
    (its push thread shut down) they are dropped, not submitted to a dead executor."""
    pushes: list[list[str]] = []
    monkeypatch.setattr(model_host_module, "push_model_ids", lambda _r, keys: pushes.append(keys))
    host = object.__new__(_BareHost)
    host._replica_id = "r1"
    host._push_thread = ThreadPoolExecutor(1, "model-ids")
    host._push_thread.shutdown(wait=True)
    host._closing = True
    host._push_routing_info(["a@1"])  # raised RuntimeError before: "cannot schedule ..."
    assert pushes == []


async def test_a_grouped_call_answers_every_model_and_hands_back_one_not_held(
    host: ModelHost, published: ModelStore
) -> None:
    """One `ReplicaBatch` carries three models: each gets its own result (the same outputs
    as a call of its own), and a model the replica does not hold is handed back
    (`NotResidentHere`) without failing the others."""
    replica = object.__new__(_BareHost)
    replica.host = host
    replica._working_set = WorkingSet(60.0)
    replica._replica_id = SimpleNamespace(unique_id="unit")
    replica._published_at = time.monotonic()
    replica._directory = SimpleNamespace(publish=lambda status: None)
    a, b = published.read_manifest("m-a", "1"), published.read_manifest("m-b", "1")
    ghost = a.model_copy(update={"model_id": "ghost"})  # no such files in the store
    rows = [[0.5, -1.0, 0.25, 2.0]]
    group = ReplicaBatch(
        [
            PredictBatch(a, [rows, rows], ["a1", "a2"]),
            PredictBatch(ghost, [rows], ["g1"]),
            PredictBatch(b, [rows], ["b1"]),
        ],
        "unit",
    )
    await host.predict_batch(PredictBatch(a, [rows], ["a0"]))  # warm, as grouped models are
    alone = await host.predict_batch(PredictBatch(b, [rows], ["b0"]))
    results = await replica.predict_many(group)
    assert isinstance(results[0], BatchResult)
    assert results[0].response(a, 1).model_id == "m-a"
    assert isinstance(results[1], NotResidentHere)  # not held here: handed back, not loaded
    assert isinstance(results[2], BatchResult)
    assert results[2].outputs == alone.outputs
    assert host.grouped_calls == 1
    assert replica._working_set.bytes() == a.total_bytes + ghost.total_bytes + b.total_bytes
