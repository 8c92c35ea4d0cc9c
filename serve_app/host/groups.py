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


def predict_requests(model: Predictor, requests: list[list[Any]]) -> list[list[Any]]:
    """One forward pass over the rows of several requests for one model, split back per
    request (raises if the pass fails). The host's dynamic batches run through it too."""
    outputs = model.predict([row for request in requests for row in request])
    split, start = [], 0
    for request in requests:
        split.append(outputs[start : start + len(request)])
        start += len(request)
    return split


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


def run_models(jobs: list[tuple[Predictor, list[list[list[Any]]]]]) -> list[Outputs]:
    """On a prediction thread: per (model, its batches of requests) one forward pass per
    batch; a failed pass is retried request by request, so each gets its own error."""
    results: list[Outputs] = []
    for model, chunks in jobs:
        answers: Outputs = []
        for chunk in chunks:
            try:
                answers.extend(predict_requests(model, chunk))
            except Exception:  # noqa: BLE001 - each request alone finds whose rows failed
                answers.extend(_one_by_one(model, chunk))
        results.append(answers)
    return results


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


async def predict_group(host: ModelHost, group: ReplicaBatch) -> list[BatchResult | BaseException]:
    """One result per batch of `group`, in order: its `BatchResult`, or `NotResidentHere`
    for a model this replica no longer holds."""
    batches = group.batches
    leases = await asyncio.gather(
        *(_lease_resident(host, batch.manifest.key, batch.manifest) for batch in batches),
        return_exceptions=True,
    )
    held = [(i, lease) for i, lease in enumerate(leases) if not isinstance(lease, BaseException)]

    def release(_: object = None) -> None:
        for _i, lease in held:
            host.cache.release(lease.key, lease.model)

    if any(isinstance(lease, asyncio.CancelledError) for lease in leases):
        release()
        raise asyncio.CancelledError
    chunks = {
        i: batches_of(
            batches[i].inputs,
            host.config.batching.for_model(batches[i].manifest.model_id).max_batch_size,
        )
        for i, _lease in held
    }
    jobs = [(lease.model, chunks[i]) for i, lease in held]
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
        for chunk in chunks[i]:
            host.batcher.count([len(rows) for rows in chunk])
        results[i] = BatchResult(
            outputs=answers,
            resident=lease.hit,
            load_wait_ms=round(lease.wait_seconds * 1000, 3),
            replica=host.replica,
        )
    return results
