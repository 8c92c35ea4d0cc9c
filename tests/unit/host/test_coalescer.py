"""A burst of changes becomes a bounded number of flushes carrying the newest value."""

from __future__ import annotations

import asyncio
import threading
import time

from serve_app.host.coalescer import Coalescer
from tests.support import wait_for


async def test_first_change_goes_out_at_once_and_a_burst_folds_into_one() -> None:
    flushed: list[tuple[float, int]] = []
    coalescer = Coalescer(
        lambda v: flushed.append((time.monotonic(), v)), 0.2, asyncio.get_running_loop()
    )
    started = time.monotonic()
    coalescer.submit(0)
    await asyncio.sleep(0.05)
    assert [v for _, v in flushed] == [0]
    assert flushed[0][0] - started < 0.05  # no wait after a quiet spell
    for value in range(1, 100):  # a storm of residency changes
        coalescer.submit(value)
    await asyncio.sleep(0.4)
    assert [v for _, v in flushed] == [0, 99]  # one more call, with the newest value
    assert flushed[1][0] - flushed[0][0] >= 0.19  # not before the window ends


async def test_submits_from_other_threads_and_a_failing_flush() -> None:
    calls: list[int] = []

    def flush(value: int) -> None:
        calls.append(value)
        if len(calls) == 1:
            raise ConnectionError("controller unreachable")

    coalescer = Coalescer(flush, 0.05, asyncio.get_running_loop())
    threads = [threading.Thread(target=coalescer.submit, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    await asyncio.to_thread(wait_for, lambda: len(calls) >= 1, 5, "the first flush")
    coalescer.submit(100)  # the failure did not wedge it
    await asyncio.to_thread(wait_for, lambda: calls[-1] == 100, 5, "the next flush")
    assert len(calls) <= 3
