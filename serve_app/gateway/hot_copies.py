"""Hot-model copies: how many replicas should hold a model, from its request rate.

A model that gets more requests than one replica should serve (`rate_per_s`) is wanted on
`ceil(rate / rate_per_s)` replicas, at most `max_copies`. The request router
(`deployments/router.py`) counts every request it routes per model (`RequestRates`) and,
when a model's holders are fewer than wanted, sends one request to the best-placed replica
that does not hold it (`serve_app.gateway.replica_ranking.rank_for_load`); that replica
loads an extra copy and marks it as one (the host keeps `copy_keys`). Traffic then spreads
over the holders by power of two choices.

When the model cools (wanted falls below its holders), the router stops sending it to the
replicas that hold it as an extra copy (`serving_holders`), so those copies go idle; a host
drops a copy idle for `cool_after_s` (`ModelCache.evict_idle_copies`), and a full cache
evicts copies before any other model. A cold model (no holder) is never copied: it is
placed once, as before, so one burst still makes exactly one load.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Collection, Hashable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

H = TypeVar("H", bound=Hashable)


class HotCopiesConfig(BaseModel):
    """`host.hot_copies`: extra copies of models over one replica's share of traffic."""

    model_config = ConfigDict(extra="forbid")

    max_copies: int = Field(
        1, ge=1, le=64, description="Most replicas holding one model; 1 (default): off."
    )
    rate_per_s: float = Field(
        50.0,
        gt=0,
        description="Requests per second one copy of a model should serve (seen by one "
        "ingress replica's router); a model over it is loaded on ceil(rate/rate_per_s) "
        "replicas, up to max_copies.",
    )
    window_s: float = Field(5.0, gt=0, le=600, description="Window the request rate is over.")
    cool_after_s: float = Field(
        30.0, gt=0, description="A host drops an extra copy that served nothing this long."
    )

    @property
    def enabled(self) -> bool:
        """Whether models may get more than one copy."""
        return self.max_copies > 1


class RequestRates:
    """Requests per second per model over a sliding window (request times, at most `cap`
    kept per model: past that the rate is only known to be at least cap / window)."""

    def __init__(
        self,
        window_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        cap: int = 100_000,
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._times: dict[str, deque[float]] = {}
        self._cap = cap
        self._pruned_at = clock()

    def record(self, key: str, requests: int = 1) -> None:
        """Count `requests` requests for `key` now."""
        now = self._clock()
        times = self._times.get(key)
        if times is None:
            times = self._times[key] = deque(maxlen=self._cap)
        times.extend([now] * min(requests, self._cap))
        self._prune_idle(now)

    def rate(self, key: str) -> float:
        """Requests per second for `key` over the last `window_s`."""
        times = self._times.get(key)
        if not times:
            return 0.0
        self._trim(times, self._clock())
        return len(times) / self.window_s

    def _trim(self, times: deque[float], now: float) -> None:
        oldest = now - self.window_s
        while times and times[0] <= oldest:
            times.popleft()

    def _prune_idle(self, now: float) -> None:
        # NOTE: bounded memory over thousands of models: forget those idle a whole window.
        if now - self._pruned_at < self.window_s:
            return
        self._pruned_at = now
        for key in list(self._times):
            self._trim(self._times[key], now)
            if not self._times[key]:
                del self._times[key]

    def __len__(self) -> int:
        return len(self._times)


class HotModels:
    """The router's view of hotness: request rates and the copies each model wants."""

    def __init__(
        self, config: HotCopiesConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or HotCopiesConfig()
        # NOTE: a model at max_copies' worth of rate needs no finer count than that.
        cap = math.ceil(self.config.max_copies * self.config.rate_per_s * self.config.window_s)
        self.rates = RequestRates(self.config.window_s, clock, cap=cap + 1)

    def record(self, key: str, requests: int = 1) -> None:
        """`requests` requests for `key` were routed (one batch of the ingress's)."""
        if self.config.enabled:
            self.rates.record(key, requests)

    def wanted(self, key: str) -> int:
        """How many replicas should hold `key` now (1 when copies are off)."""
        if not self.config.enabled:
            return 1
        need = math.ceil(self.rates.rate(key) / self.config.rate_per_s)
        return max(1, min(self.config.max_copies, need))


def serving_holders(holders: Collection[H], copy_holders: Collection[H], wanted: int) -> set[H]:
    """Which holders of a model take its traffic: all of them while the model wants as
    many copies as it has; once it wants fewer (it cooled), only those that do not hold it
    as an extra copy, so the copies go idle and are dropped (all of them, if every holder
    holds a copy: the primary was evicted and a copy took its place)."""
    holders = set(holders)
    if len(holders) <= wanted:
        return holders
    primaries = holders - set(copy_holders)
    return primaries or holders
