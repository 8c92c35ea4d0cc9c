"""Load threads run below the thread that starts them, also inside Ray workers, which Ray
starts at nice 15 (an absolute nice 10 would have raised the loads above serving)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from serve_app.host.model_host import MAX_NICE, ModelHost, load_thread_nice

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice")


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_step_is_relative_and_capped() -> None:
    assert load_thread_nice(0) == 10
    assert load_thread_nice(15) == MAX_NICE
    assert load_thread_nice(19) == MAX_NICE


def in_thread_at(nice: int, host: ModelHost) -> tuple[int, int]:
    """From a fresh thread at `nice` (as Ray's worker threads are), the nice values of a
    load thread it starts and of a predict thread it starts."""
    out: dict[str, int] = {}

    def body() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        out["load"] = host._load_pool.submit(own_nice).result()
        out["predict"] = host.predict_pool.submit(own_nice).result()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return out["load"], out["predict"]


def test_load_threads_run_below_serving_threads_in_a_ray_worker(host: ModelHost) -> None:
    base = own_nice()
    # raising nice is always permitted; this thread models a Ray worker's main thread
    load, predict = in_thread_at(max(base, 15), host)
    assert predict == max(base, 15)
    assert load == load_thread_nice(predict) > predict
