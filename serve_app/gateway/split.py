"""Weighted traffic splits: which arm of an alias serves a request.

A split is a list of arms with integer-or-decimal weights summing to 100. With a sticky key
(e.g. the `X-User-Id` header) the arm is a pure function of (alias, key): the key is hashed
(blake2b, so every process and every restart agrees) to a point in [0, 1) and the point falls
into one arm's share. A key therefore keeps its arm while the split is unchanged, and moving
weight from one arm to another moves only the keys in the share that changed hands. Without
a key the arm is drawn at random by weight.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

_SCALE = float(2**64)


@dataclass(frozen=True)
class Arm:
    """One arm of a split: a target (`model_id` or `model_id@version`) and its weight."""

    target: str
    weight: float


class Split:
    """Chooses an arm by sticky key (deterministic) or by weighted draw (see module doc)."""

    def __init__(self, name: str, arms: Sequence[Arm], rng: random.Random | None = None) -> None:
        if not arms:
            raise ValueError(f"split {name!r} has no arms")
        total = sum(a.weight for a in arms)
        if total <= 0:
            raise ValueError(f"split {name!r} has no positive weight")
        self.name = name
        self.arms = tuple(arms)
        self._rng = rng or random.Random()
        # NOTE: cumulative upper bounds in [0, 1]; zero-weight arms get an empty share.
        bounds, running = [], 0.0
        for arm in self.arms:
            running += arm.weight / total
            bounds.append(running)
        bounds[-1] = 1.0
        self._bounds = bounds

    def point(self, key: str) -> float:
        """Where `key` falls in [0, 1) for this split (stable across processes)."""
        digest = hashlib.blake2b(f"{self.name}\x00{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / _SCALE

    def _arm_at(self, point: float) -> Arm:
        return self.arms[min(bisect.bisect_right(self._bounds, point), len(self.arms) - 1)]

    def choose(self, key: str | None = None) -> Arm:
        """The arm for sticky `key`, or a weighted random arm when there is no key."""
        if key:
            return self._arm_at(self.point(key))
        return self._arm_at(self._rng.random())
