"""Request traces for the capacity planner and the cache benchmarks.

A trace is a list of `TraceRequest(key, nbytes, load_seconds, at)`: which model version a
request named, the bytes it occupies when resident, the seconds a load of it takes, and
when the request arrived (seconds from the start of the trace).

Two sources:

- the ingress access log (`serve_app.observability.logs`: one JSON line per request,
  `logger: serve_app.access`, with `ts`, `model_id`, `version`, `status`, `cold`,
  `load_wait_ms`); `read_access_log` keeps the answered requests (status 200) in order;
- a synthetic Zipf over models (`zipf_trace`), e.g. the registry's real sizes
  (`registry_models`).

Sizes come from the store's manifests (weight bytes: what the cache measures once loaded).
Load seconds come from the log where it saw the model load (median `load_wait_ms` of its
cold requests), else from a `LoadTimeModel` (a fixed cost plus bytes over a throughput).
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from serve_app.storage.manifest import Manifest
from serve_app.storage.registry import Registry

ACCESS_LOGGER = "serve_app.access"


@dataclass(frozen=True)
class TraceRequest:
    """One request: the model's key, resident bytes, load seconds and arrival time (s)."""

    key: str
    nbytes: int
    load_seconds: float
    at: float = 0.0


@dataclass(frozen=True)
class AccessEvent:
    """One answered request of the access log."""

    at: float  # seconds since the epoch (the log's `ts`: whole seconds)
    key: str  # model_id@version
    cold: bool
    load_wait_s: float


@dataclass(frozen=True)
class LoadTimeModel:
    """Seconds a load takes when no measurement exists: `fixed_s + bytes / bytes_per_s`."""

    fixed_s: float = 0.15
    bytes_per_s: float = 200e6

    def seconds(self, nbytes: int) -> float:
        """Estimated load seconds of a model of `nbytes`."""
        return self.fixed_s + nbytes / self.bytes_per_s


def read_access_log(lines: Iterable[str]) -> list[AccessEvent]:
    """The answered requests (status 200) of the ingress access lines among `lines`.

    Other lines (other loggers, Ray's own output, text before the JSON object on a line)
    are skipped, so a replica's whole log file can be given.
    """
    events = []
    for line in lines:
        start = line.find("{")
        if start < 0 or ACCESS_LOGGER not in line:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("logger") != ACCESS_LOGGER:
            continue
        if record.get("status") != 200 or not record.get("model_id") or not record.get("version"):
            continue
        at = datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        events.append(
            AccessEvent(
                at=at.timestamp(),
                key=f"{record['model_id']}@{record['version']}",
                cold=bool(record.get("cold")),
                load_wait_s=float(record.get("load_wait_ms") or 0.0) / 1000,
            )
        )
    return events


def measured_load_seconds(events: Sequence[AccessEvent]) -> dict[str, float]:
    """Per model version, the median load wait of its cold requests in the log."""
    waits: dict[str, list[float]] = {}
    for event in events:
        if event.cold and event.load_wait_s > 0:
            waits.setdefault(event.key, []).append(event.load_wait_s)
    return {key: statistics.median(values) for key, values in waits.items()}


def trace_from_access_log(
    events: Sequence[AccessEvent],
    sizes: Mapping[str, int],
    load_time: LoadTimeModel | None = None,
) -> list[TraceRequest]:
    """The trace of `events`, with each version's bytes from `sizes` (key -> bytes).

    Raises:
        KeyError: a version of the log is not in `sizes` (not in the registry).
    """
    load_time = load_time or LoadTimeModel()
    measured = measured_load_seconds(events)
    missing = sorted({e.key for e in events} - set(sizes))
    if missing:
        raise KeyError(f"versions of the log not in the registry: {', '.join(missing[:5])}")
    start = events[0].at if events else 0.0
    return [
        TraceRequest(
            e.key,
            sizes[e.key],
            measured.get(e.key, load_time.seconds(sizes[e.key])),
            e.at - start,
        )
        for e in events
    ]


def registry_models(
    manifests: Iterable[Manifest], load_time: LoadTimeModel | None = None
) -> list[tuple[str, int, float]]:
    """(key, weight bytes, estimated load seconds) of each manifest, e.g. a registry's."""
    load_time = load_time or LoadTimeModel()
    return [(m.key, m.weight_bytes, load_time.seconds(m.weight_bytes)) for m in manifests]


def zipf_trace(
    models: Sequence[tuple[str, int, float]],
    alpha: float,
    length: int,
    seed: int,
    rate_per_s: float | None = None,
) -> list[TraceRequest]:
    """`length` independent requests, Zipf(alpha) over `models` in a seeded random rank order.

    Args:
        models: (key, resident bytes, load seconds) of each model.
        alpha: Zipf exponent; the model of rank r is requested with weight r**-alpha.
        length: number of requests.
        seed: seeds both the rank order (which model is popular) and the draws.
        rate_per_s: requests per second, evenly spaced (None: all at time 0).
    """
    rng = random.Random(seed)
    ranked = list(models)
    rng.shuffle(ranked)
    weights = [(rank + 1) ** -alpha for rank in range(len(ranked))]
    picks = rng.choices(ranked, weights=weights, k=length)
    step = 0.0 if not rate_per_s else 1.0 / rate_per_s
    return [
        TraceRequest(key, nbytes, cost, i * step) for i, (key, nbytes, cost) in enumerate(picks)
    ]


def latest_manifests(registry: Registry) -> list[Manifest]:
    """The latest version of every model of a (refreshed) registry."""
    return [registry.resolve(s.model_id) for s in registry.summaries()]
