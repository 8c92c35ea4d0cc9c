"""Streaming reads of model files from the store into host memory.

`VersionFetch` reads the files of one version with parallel ranged GETs streamed straight
into preallocated buffers (`host_buffer`), hashing each file while its chunks arrive
(`_StreamDigest`), so nothing unverified is handed out and verification needs no second
pass. `storage_errors` turns transport failures of the store into StorageUnavailable, here
and for every other read or write of the store (which import it from
`serve_app.storage.store`).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import urllib3
from botocore.exceptions import BotoCoreError, ClientError

from serve_app.errors import ArtifactCorrupt, StorageUnavailable
from serve_app.storage.manifest import Manifest
from serve_app.storage.ranged import RangeReader

# NOTE: urllib3 errors come from reading S3 response bodies (serve_app.storage.ranged).
_STORAGE_ERRORS = (OSError, BotoCoreError, ClientError, TimeoutError, urllib3.exceptions.HTTPError)


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn transport and permission failures of the store into StorageUnavailable (503).

    FileNotFoundError passes through untouched: callers decide what a missing key means.
    """
    try:
        yield
    except FileNotFoundError:
        raise
    except _STORAGE_ERRORS as exc:
        # NOTE: the message names the operation and the error type, never credentials.
        raise StorageUnavailable(
            f"model store unavailable while {what}: {type(exc).__name__}", retry_after_s=5.0
        ) from exc


Buffer = bytearray | mmap.mmap


def host_buffer(size: int) -> Buffer:
    """A writable buffer of `size` bytes for a model file, not yet touched.

    Anonymous memory (`mmap`), not `bytearray`: a bytearray is zero-filled when created,
    which faults in every page before the first byte arrives (a second full pass over the
    model); mapped pages are faulted in as the download writes them, and go back to the OS
    as soon as the last tensor view is dropped.
    """
    # NOTE: no MADV_HUGEPAGE: with the usual `defrag=madvise` the kernel compacts memory
    # inside the page faults, which made reads about 2x slower on the bench machine.
    return mmap.mmap(-1, size) if size else bytearray()


class _StreamDigest:
    """sha256 of one file whose chunks land in any order: each chunk is hashed as soon as
    every byte before it has been hashed, by the thread that completed it or the one that
    is hashing already (hashlib releases the GIL, so other chunks keep downloading)."""

    def __init__(self, buffer: Buffer) -> None:
        self._view = memoryview(buffer)
        self._hash = hashlib.sha256()
        self._next = 0
        self._landed: dict[int, int] = {}
        self._busy = False
        self._lock = threading.Lock()

    def landed(self, start: int, end: int) -> None:
        """Bytes [start, end) are in the buffer; hash whatever is contiguous now."""
        with self._lock:
            self._landed[start] = end
            if self._busy:
                return
            self._busy = True
        while True:
            with self._lock:
                end = self._landed.pop(self._next, None)
                if end is None:
                    self._busy = False
                    return
                start = self._next
            self._hash.update(self._view[start:end])
            with self._lock:
                self._next = end

    def hexdigest(self) -> str:
        """The digest of every byte landed so far (call once all chunks have landed)."""
        return self._hash.hexdigest()

    @property
    def hashed_bytes(self) -> int:
        """How many leading bytes have been hashed."""
        return self._next


class ByteClock:
    """When bytes last arrived from the store, for any fetch: the stall watchdog's clock.

    One per store, shared by its concurrent fetches: a fetch whose GETs queue behind
    another load's (the pool is shared) is waiting on a busy store, not a stalled one, and
    must not time out while bytes keep flowing.
    """

    def __init__(self) -> None:
        self.last = time.monotonic()

    def tick(self, nbytes: int) -> None:
        """`nbytes` just arrived (thread-safe: one float assignment)."""
        self.last = time.monotonic()


class VersionFetch:
    """The files of one version streaming from the store into preallocated buffers.

    Ranged GETs of `chunk_bytes` (`store.chunk_bytes`) run on `pool`, the store's pool
    (`store.max_concurrency` in flight, shared by every load of the replica), each read by
    `reader` straight into its place in the file's buffer; each file is hashed while its
    chunks arrive, so verification needs no second pass. `wait(paths)` returns verified
    buffers for some files while the others are still arriving (the loader builds the
    tokenizer meanwhile). The whole download is bounded by `timeout_s`
    (`store.download_timeout_s`), and cut off once the store has sent no byte for
    `stall_timeout_s` (`store.stall_timeout_s`): a stalled server (it accepts connections
    and never answers) costs a 503 after that long, not after the socket read timeouts of
    every retry. The first failure cancels the remaining GETs. Started by
    `ModelStore.start_fetch`, which checks the declared sizes first.
    """

    def __init__(
        self,
        manifest: Manifest,
        order: list[str],
        *,
        reader: RangeReader,
        pool: ThreadPoolExecutor,
        base: str,
        chunk_bytes: int,
        timeout_s: float,
        stall_timeout_s: float | None = None,
        clock: ByteClock | None = None,
    ) -> None:
        self.manifest = manifest
        self._reader = reader
        self._started = time.monotonic()
        self._deadline = self._started + timeout_s
        self._stall_s = stall_timeout_s
        self._clock = clock or ByteClock()
        self._cancelled = threading.Event()
        self._error: BaseException | None = None
        entries = {e.path: e for e in manifest.files}
        paths = [p for p in order if p in entries] + [p for p in entries if p not in order]
        self.buffers = {p: host_buffer(entries[p].size) for p in paths}
        self._digests = {p: _StreamDigest(self.buffers[p]) for p in paths}
        self._futures: dict[str, list[Future[None]]] = {p: [] for p in paths}
        for path in paths:
            view = memoryview(self.buffers[path])
            for start in range(0, entries[path].size, chunk_bytes):
                piece = view[start : start + chunk_bytes]
                self._futures[path].append(
                    pool.submit(self._read, path, f"{base}/{path}", start, piece)
                )

    def _read(self, path: str, key: str, start: int, view: memoryview) -> None:
        if self._cancelled.is_set():
            return
        try:
            self._reader.read_into(key, start, view, self._deadline, self._clock.tick)
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            self._cancelled.set()
            raise
        self._digests[path].landed(start, start + len(view))

    def wait(self, paths: list[str] | None = None) -> dict[str, Buffer]:
        """Verified buffers of `paths` (default: every file) once they have arrived.

        Raises:
            ArtifactCorrupt: a file does not match its manifest sha256, or is missing from
                the store (the manifest is there, so the artifact is incomplete).
            StorageUnavailable: the store failed, the download passed its deadline, or the
                store sent nothing for `stall_timeout_s`.
        """
        paths = list(self.buffers) if paths is None else paths
        pending = [f for p in paths for f in self._futures[p]]
        while pending:
            _, not_done = futures_wait(
                pending, timeout=self._next_check(), return_when=FIRST_EXCEPTION
            )
            if self._error is not None:
                self.cancel()
                if isinstance(self._error, FileNotFoundError):
                    raise ArtifactCorrupt(
                        f"{self.manifest.key}: a file of its manifest is missing from the store"
                    ) from self._error
                with storage_errors("downloading model files"):
                    raise self._error
            pending = list(not_done)
            if pending and time.monotonic() >= self._deadline:
                self.cancel()
                raise StorageUnavailable(
                    f"download of {self.manifest.key} exceeded store.download_timeout_s",
                    retry_after_s=5.0,
                )
            if pending and self._stalled():
                self.cancel()
                raise StorageUnavailable(
                    f"download of {self.manifest.key}: the model store sent no data for "
                    f"{self._stall_s:g}s (store.stall_timeout_s)",
                    retry_after_s=5.0,
                )
        entries = {e.path: e for e in self.manifest.files}
        for path in paths:
            digest = self._digests[path].hexdigest()
            if digest != entries[path].sha256:
                self.cancel()
                raise ArtifactCorrupt(
                    f"{self.manifest.model_id} version {self.manifest.version}: file {path} "
                    f"has sha256 {digest[:12]}…, manifest says {entries[path].sha256[:12]}…; "
                    "not loaded"
                )
        return {p: self.buffers[p] for p in paths}

    def _stall_at(self) -> float:
        """When the fetch counts as stalled if no byte arrives before (inf: no watchdog)."""
        if self._stall_s is None:
            return float("inf")
        return max(self._started, self._clock.last) + self._stall_s

    def _stalled(self) -> bool:
        return time.monotonic() >= self._stall_at()

    def _next_check(self) -> float:
        """Seconds to wait before checking the deadline and the stall watchdog again."""
        return max(0.0, min(self._deadline, self._stall_at()) - time.monotonic())

    def cancel(self) -> None:
        """Stop issuing this version's GETs (those in flight finish or fail on their own)."""
        self._cancelled.set()
        for futures in self._futures.values():
            for future in futures:
                future.cancel()
