"""The model host's Ray glue without Ray running (issue 15 item 5): the push of a replica's
model ids to Serve's controller (whose first call may look the controller up in the GCS)
runs off the event loop, in order."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import deployments.model_host as model_host_module
from deployments.model_host import ModelHostDeployment


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
