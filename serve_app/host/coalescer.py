"""Coalescing of bursty notifications: at most one call per interval, always the newest value.

A model host tells Serve's controller which models it holds on every residency change (load
start, load end, eviction). Under a storm of cold requests that is dozens of changes a
second, and each one made the controller rebroadcast the pool's replica set to every router
(each ingress replica's among them), a cost the other pools' requests paid in the shared
ingress. `Coalescer` bounds it: the first change after a quiet spell goes out on the event
loop's next turn, later ones within `every_s` fold into one call at the window's end that
carries only the newest value. Ray's own `@serve.multiplexed` pushes every 0.1 s the same way.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Coalescer(Generic[T]):
    """Calls `flush(value)` on `loop`, at most once per `every_s`, with the newest value."""

    def __init__(
        self,
        flush: Callable[[T], None],
        every_s: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._flush = flush
        self.every_s = every_s
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[T] = []  # at most one: the newest value not yet flushed
        self._scheduled = False
        self._last_flush = float("-inf")

    def submit(self, value: T) -> None:
        """Queue `value` (replacing any unflushed one); safe from any thread."""
        with self._lock:
            self._pending[:] = [value]
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        delay = max(0.0, self._last_flush + self.every_s - time.monotonic())
        self._loop.call_later(delay, self._run)

    def _run(self) -> None:
        with self._lock:
            self._scheduled = False
            if not self._pending:
                return
            value = self._pending.pop()
        self._last_flush = time.monotonic()
        # NOTE: a failing flush is logged; the next change tries again.
        try:
            self._flush(value)
        except Exception:
            logger.exception("coalesced flush failed")
