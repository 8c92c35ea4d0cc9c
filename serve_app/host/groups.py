"""A grouped call on a host: the batches of several models (`ReplicaBatch`) in one job.

The ingress sends one call per replica carrying every warm request waiting for it
(`serve_app.gateway.replica_batches`). Run through `ModelHost.predict_batch` model by model,
each model would pay its own hand-off to a prediction thread and back, and its requests
their own passes through the host's dynamic batcher. So a group takes every model's lease
at once, then runs all their forward passes in one job on the prediction threads:
per model, passes over its requests' rows of at most the model's `max_batch_size` rows each;
a pass that fails is retried request by request, so one bad request gets its own error and
the others their outputs (as the host's dynamic batches do). Leases end when the job ends,
even if the caller stopped waiting. A model the replica no longer holds (evicted since it
last reported it) is not loaded inside the group, where the load would hold every other
model's requests: its slot gets `NotResidentHere`, and the ingress resends its requests on
the per-model path.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from serve_app.errors import NotResidentHere
from serve_app.schemas import BatchResult, ReplicaBatch

if TYPE_CHECKING:
    from serve_app.cache.model_cache import Lease
    from serve_app.host.model_host import ModelHost
    from serve_app.host.predictor import Predictor
    from serve_app.storage.manifest import Manifest

Outputs = list[list[Any] | BaseException]  # per request: its outputs or its error


def run_models(jobs: list[tuple[Predictor, list[list[Any]], int]]) -> list[Outputs]:
    """On a prediction thread: per (model, requests, max_batch_size) forward passes over
    the requests' rows, at most `max_batch_size` rows each (a bigger request alone), split
    back per request; a failed pass is retried request by request."""
    results: list[Outputs] = []
    for model, requests, limit in jobs:
        answers: Outputs = []
        for chunk in batches_of(requests, limit):
            answers.extend(_forward(model, chunk))
        results.append(answers)
    return results


def batches_of(requests: list[list[Any]], limit: int) -> list[list[list[Any]]]:
    """Consecutive requests in batches of at most `limit` rows (as the host's dynamic
    batches take them: a request bigger than the limit runs alone)."""
    chunks: list[list[list[Any]]] = []
    rows = 0
    for request in requests:
        if not chunks or rows + len(request) > limit:
            chunks.append([])
            rows = 0
        chunks[-1].append(request)
        rows += len(request)
    return chunks


def _forward(model: Predictor, requests: list[list[Any]]) -> Outputs:
    rows = [row for request in requests for row in request]
    try:
        outputs = model.predict(rows)
    except Exception:  # noqa: BLE001 - each request alone finds whose rows failed
        return _one_by_one(model, requests)
    split: Outputs = []
    start = 0
    for request in requests:
        split.append(outputs[start : start + len(request)])
        start += len(request)
    return split


def _one_by_one(model: Predictor, requests: list[list[Any]]) -> Outputs:
    answers: Outputs = []
    for request in requests:
        try:
            answers.append(model.predict(request))
        except Exception as exc:  # noqa: BLE001 - handed to that request's caller
            answers.append(exc)
    return answers


async def _lease_resident(host: ModelHost, key: str, manifest: Manifest) -> Lease[Predictor]:
    """The lease of a resident model; one that is not resident is not loaded here."""
    if key not in host.cache:
        raise NotResidentHere(f"{key} is not resident on replica {host.replica}")
    return await host.acquire(manifest)


def _limit(host: ModelHost, model_id: str) -> int:
    return host.config.batching.for_model(model_id).max_batch_size


async def predict_group(host: ModelHost, group: ReplicaBatch) -> list[BatchResult | BaseException]:
    """One result per batch of `group`, in order: its `BatchResult`, or the typed error
    that kept its model from being leased (a failed load)."""
    batches = group.batches
    leases = await asyncio.gather(
        *(_lease_resident(host, batch.manifest.key, batch.manifest) for batch in batches),
        return_exceptions=True,
    )
    for lease in leases:
        if isinstance(lease, asyncio.CancelledError):
            raise lease
    held = [(i, lease) for i, lease in enumerate(leases) if not isinstance(lease, BaseException)]
    jobs = [
        (lease.model, batches[i].inputs, _limit(host, batches[i].manifest.model_id))
        for i, lease in held
    ]

    def release(_: object = None) -> None:
        for _i, lease in held:
            host.cache.release(lease.key, lease.model)

    work = asyncio.get_running_loop().run_in_executor(host.predict_pool, run_models, jobs)
    try:
        outputs = await asyncio.shield(work)
    finally:
        if work.done():
            release()
        else:
            work.add_done_callback(release)
    results: list[Any] = list(leases)  # a held lease's slot gets its BatchResult below
    for (i, lease), answers in zip(held, outputs, strict=True):
        manifest = batches[i].manifest
        limit = _limit(host, manifest.model_id)
        for chunk in batches_of(batches[i].inputs, limit):
            host.batcher.count([len(rows) for rows in chunk])
        if not lease.hit and host.metrics is not None:
            host.metrics.observe_wait(
                manifest.model_id, manifest.version, lease.wait_seconds * 1000
            )
        results[i] = BatchResult(
            outputs=answers,
            resident=lease.hit,
            load_wait_ms=round(lease.wait_seconds * 1000, 3),
            replica=host.replica,
        )
    return results
