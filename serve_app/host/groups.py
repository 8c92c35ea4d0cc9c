"""A grouped call on a host: the batches of several models (`ReplicaBatch`) in one job.

The ingress sends one call per replica carrying every warm request waiting for it
(`serve_app.gateway.replica_batches`). Run through `ModelHost.predict_batch` model by model,
each model's requests would still pay their own hand-off to a prediction thread and back,
which under traffic spread over many models is most of what a request costs the host. So a
group takes every model's lease at once (a model that is not resident loads as usual, and
one that fails to load fails only its own requests), then runs all their forward passes in
one job on the prediction threads: per model one forward pass over all its requests' rows;
if that fails, each request alone, so one bad request gets its own error and the others
their outputs (as the host's dynamic batches do). Leases end when the job ends, even if the
caller stopped waiting.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from serve_app.schemas import BatchResult, ReplicaBatch

if TYPE_CHECKING:
    from serve_app.host.model_host import ModelHost
    from serve_app.host.predictor import Predictor

Outputs = list[list[Any] | BaseException]  # per request: its outputs or its error


def run_models(jobs: list[tuple[Predictor, list[list[Any]]]]) -> list[Outputs]:
    """On a prediction thread: per (model, requests) one forward pass over every request's
    rows, split back per request; a failed pass is retried request by request."""
    results: list[Outputs] = []
    for model, requests in jobs:
        rows = [row for request in requests for row in request]
        try:
            outputs = model.predict(rows)
        except Exception:  # noqa: BLE001 - each request alone finds whose rows failed
            results.append(_one_by_one(model, requests))
            continue
        split: Outputs = []
        start = 0
        for request in requests:
            split.append(outputs[start : start + len(request)])
            start += len(request)
        results.append(split)
    return results


def _one_by_one(model: Predictor, requests: list[list[Any]]) -> Outputs:
    answers: Outputs = []
    for request in requests:
        try:
            answers.append(model.predict(request))
        except Exception as exc:  # noqa: BLE001 - handed to that request's caller
            answers.append(exc)
    return answers


async def predict_group(host: ModelHost, group: ReplicaBatch) -> list[BatchResult | BaseException]:
    """One result per batch of `group`, in order: its `BatchResult`, or the typed error
    that kept its model from being leased (a failed load)."""
    batches = group.batches
    leases = await asyncio.gather(
        *(host.acquire(batch.manifest) for batch in batches), return_exceptions=True
    )
    for lease in leases:
        if isinstance(lease, asyncio.CancelledError):
            raise lease
    held = [(i, lease) for i, lease in enumerate(leases) if not isinstance(lease, BaseException)]
    jobs = [(lease.model, batches[i].inputs) for i, lease in held]

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
        host.batcher.count([len(rows) for rows in batches[i].inputs])
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
