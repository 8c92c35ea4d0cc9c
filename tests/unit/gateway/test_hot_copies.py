"""Hot-model copies, the pure part: request rates over a window, the copies a model wants,
and which holders take its traffic once it cools."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.gateway.hot_copies import (
    HotCopiesConfig,
    HotModels,
    RequestRates,
    serving_holders,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_counts_the_window_and_forgets_what_left_it() -> None:
    clock = Clock()
    rates = RequestRates(window_s=5, clock=clock)
    for _ in range(50):
        rates.record("hot@1")
        clock.now += 0.1  # 10/s for 5 s
    rates.record("cold@1")
    assert rates.rate("hot@1") == pytest.approx(10, rel=0.25)
    assert rates.rate("cold@1") == pytest.approx(0.2)
    clock.now += 6
    assert rates.rate("hot@1") == 0
    rates.record("other@1")  # a record after a whole idle window prunes idle models
    assert len(rates) == 1


def test_copies_wanted_follow_the_rate_up_to_max_copies() -> None:
    clock = Clock()
    hot = HotModels(HotCopiesConfig(max_copies=3, rate_per_s=4, window_s=2), clock=clock)
    assert hot.wanted("k@1") == 1  # never seen
    for _ in range(10):  # 5/s: over one copy's 4/s
        hot.record("k@1")
        clock.now += 0.2
    assert hot.wanted("k@1") == 2
    for _ in range(100):  # 50/s: capped
        hot.record("k@1")
        clock.now += 0.02
    assert hot.wanted("k@1") == 3
    clock.now += 3  # cooled: nothing in the window
    assert hot.wanted("k@1") == 1
    hot.record("k@1", requests=9)  # one batch of 9 requests in a 2 s window: 4.5/s
    assert hot.wanted("k@1") == 2


def test_copies_off_by_default_and_records_nothing() -> None:
    hot = HotModels()
    for _ in range(1000):
        hot.record("k@1")
    assert hot.wanted("k@1") == 1
    assert len(hot.rates) == 0
    with pytest.raises(ValidationError):
        HotCopiesConfig(max_copies=0)


def test_serving_holders_drop_copies_only_once_the_model_cools() -> None:
    holders, copies = {"a", "b", "c"}, {"b", "c"}
    assert serving_holders(holders, copies, wanted=3) == {"a", "b", "c"}
    assert serving_holders(holders, copies, wanted=1) == {"a"}
    # the primary was evicted: the copies are all there is
    assert serving_holders({"b", "c"}, copies, wanted=1) == {"b", "c"}
    assert serving_holders({"a"}, set(), wanted=2) == {"a"}
