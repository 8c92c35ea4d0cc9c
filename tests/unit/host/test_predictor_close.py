"""Closing a model (what every eviction does, on the replica's event loop) frees its tensors
at once and never runs a full garbage collection, which holds the GIL for ~170 ms in a
replica and stalled every warm request behind each eviction."""

from __future__ import annotations

import gc

import pytest

from serve_app.host.model_host import ModelHost
from serve_app.storage.store import ModelStore


def test_close_releases_every_storage_without_a_gc(
    host: ModelHost, published: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = host.loader.load(published.read_manifest("m-a", "1"))
    module = predictor.module
    assert module is not None
    tensors = [*module.parameters(), *module.buffers()]
    assert sum(t.untyped_storage().nbytes() for t in tensors) > 0
    # a reference cycle through the module would keep it alive until a gc ran
    module.__dict__["cycle"] = module

    def no_gc(*args: object) -> int:
        raise AssertionError("close() ran a garbage collection")

    monkeypatch.setattr(gc, "collect", no_gc)
    predictor.close()
    assert predictor.module is None
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    with pytest.raises(RuntimeError):
        predictor.predict([[0.0]])
