"""The working set of a host replica: bytes of the distinct models requested in a window.

Each host replica counts the models requested of it (`WorkingSet.record`, on every
predict) and reports the bytes of those requested in the last `window_s` seconds, with its
budget, through Serve's replica autoscaling stats (`record_autoscaling_stats` of
`deployments/model_host.py`). The pool's autoscaling policy (`deployments/autoscaling.py`,
Serve's custom-policy hook) sums them over the replicas and asks for enough replicas that
the working set fills each budget to at most `target_fill` (`replicas_for_working_set`),
or more if the load (Serve's default policy on ongoing requests) asks for more.

With affinity routing a model is served by one replica, so the sum over replicas is the
pool's working set; a model served by two replicas in the window (a hot copy, or a model
that moved when the pool changed size) counts twice, which errs on the side of capacity.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field


class WorkingSetConfig(BaseModel):
    """`autoscale_on_working_set` of a pool with `autoscaling`: scale on bytes too."""

    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(
        60.0, gt=0, le=3600, description="Models requested this recently form the working set."
    )
    target_fill: float = Field(
        0.9,
        gt=0,
        le=4,
        description="Share of the replicas' budgets the working set should fill; over it "
        "the pool scales up (within autoscaling's max_replicas).",
    )


class WorkingSet:
    """Distinct models requested within `window_s`, with their bytes (one replica's)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()  # key -> (at, bytes)

    def record(self, key: str, nbytes: int) -> None:
        """`key` (of `nbytes` bytes) was requested now."""
        self._seen[key] = (self._clock(), nbytes)
        self._seen.move_to_end(key)
        self._expire()

    def bytes(self) -> int:
        """Bytes of the distinct models requested in the last `window_s` seconds."""
        self._expire()
        return sum(nbytes for _, nbytes in self._seen.values())

    def __len__(self) -> int:
        self._expire()
        return len(self._seen)

    def _expire(self) -> None:
        cutoff = self._clock() - self.window_s
        while self._seen:
            key, (at, _) = next(iter(self._seen.items()))
            if at >= cutoff:
                return
            del self._seen[key]


def replicas_for_working_set(
    working_set_bytes: Iterable[float], budgets: Iterable[float], target_fill: float
) -> int:
    """Replicas a pool needs so that its working set (the sum of what each replica reports)
    fills each replica's budget to at most `target_fill`; 0 before any replica reported."""
    budgets = [b for b in budgets if b > 0]
    if not budgets:
        return 0
    per_replica = min(budgets) * target_fill
    return math.ceil(sum(working_set_bytes) / per_replica)
