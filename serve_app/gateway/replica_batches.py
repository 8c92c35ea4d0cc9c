"""Grouping by replica: the requests one ingress -> host call carries.

With traffic spread over many warm models, per-model batches are one request each and every
request paid a full Serve hop (routing, serialisation, the host's request handling). The
ingress instead queues warm requests per replica that holds their model (the router says
which: `deployments.router.ModelAffinityRouter.hop_target`) and sends what waits as one
`ReplicaBatch`: one `PredictBatch` per model, each still run as that model's own forward
passes on the host. `group` builds it from the queued calls; `outcomes` hands each call its
answer back.
"""

from __future__ import annotations

from serve_app.schemas import BatchResult, PredictBatch, PredictCall, PredictResponse, ReplicaBatch

Outcome = PredictResponse | BaseException
Place = tuple[int, int]  # (batch index, request index within the batch)


def group(calls: list[PredictCall], replica: str) -> tuple[ReplicaBatch, list[Place]]:
    """One batch per model version, in order of first arrival, and where each call went."""
    index: dict[str, int] = {}
    members: list[list[PredictCall]] = []
    places: list[Place] = []
    for call in calls:
        at = index.setdefault(call.manifest.key, len(members))
        if at == len(members):
            members.append([])
        places.append((at, len(members[at])))
        members[at].append(call)
    batches = [
        PredictBatch(same[0].manifest, [c.inputs for c in same], [c.request_id for c in same])
        for same in members
    ]
    return ReplicaBatch(batches, replica), places


def outcomes(
    batch: ReplicaBatch, places: list[Place], results: list[BatchResult | BaseException]
) -> list[Outcome]:
    """Each call's response or error: a model's raised error (e.g. its load failed) goes to
    every call of that model, a request's own error only to it."""
    if len(results) != len(batch.batches):
        raise RuntimeError(f"{len(batch.batches)} batches got {len(results)} results")
    answers: list[Outcome] = []
    for at, item in places:
        result = results[at]
        if isinstance(result, BaseException):
            answers.append(result)
        else:
            answers.append(result.outcome(batch.batches[at].manifest, item))
    return answers
