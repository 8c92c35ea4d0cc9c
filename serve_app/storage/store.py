"""The model store: immutable model versions in S3, published and fetched by manifest.

Layout under the store root (`s3://bucket/prefix`):

    <model_id>/<version>/manifest.json     written last: its presence publishes the version
    <model_id>/<version>/<file>            the files the manifest lists (size + sha256)

Model files are read with parallel ranged GETs streamed straight into preallocated buffers
(`VersionFetch`) and hashed while they arrive; nothing unverified is handed out. Verified
copies live in the local disk tier (`DiskTier`), which serves reloads without S3.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path

import fsspec
import urllib3
from botocore.exceptions import BotoCoreError, ClientError

from serve_app.config import StoreConfig
from serve_app.errors import ArtifactCorrupt, ModelTooLarge, StorageUnavailable, VersionExists
from serve_app.storage.listing import ListingFailed, S3Lister
from serve_app.storage.manifest import MANIFEST_NAME, Manifest, now_iso
from serve_app.storage.ranged import FsspecRangeReader, RangeReader, S3RangeReader

logger = logging.getLogger(__name__)

_DISK_PIECE = 16 * 2**20
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
CLAIM_NAME = ".claim"  # created first, conditionally, by the one publisher of a version

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


def make_filesystem(config: StoreConfig) -> fsspec.AbstractFileSystem:
    """An s3fs filesystem for `config`, with credentials from config or the AWS variables."""
    import s3fs

    key = config.access_key_id.get_secret_value() if config.access_key_id else None
    secret = config.secret_access_key.get_secret_value() if config.secret_access_key else None
    region = config.region or os.environ.get("AWS_REGION") or "us-east-1"
    fs = s3fs.S3FileSystem(
        key=key,
        secret=secret,
        endpoint_url=config.resolved_endpoint(),
        client_kwargs={"region_name": region},
        config_kwargs={
            "connect_timeout": config.connect_timeout_s,
            "read_timeout": config.read_timeout_s,
            "retries": {"max_attempts": config.retries + 1, "mode": "standard"},
            "max_pool_connections": max(10, config.max_concurrency * 2),
        },
        skip_instance_cache=True,
        use_listings_cache=False,
    )
    fs.retries = config.retries + 1
    return fs


class ModelStore:
    """Publishes and fetches model versions under one S3 prefix."""

    def __init__(self, config: StoreConfig, fs: fsspec.AbstractFileSystem | None = None) -> None:
        self.config = config
        self.fs = fs if fs is not None else make_filesystem(config)
        # NOTE: model bytes go through a reader that streams into preallocated buffers,
        # listings through a lean lister; manifests and publishing stay on fsspec.
        self.reader: RangeReader = S3RangeReader(config) if fs is None else FsspecRangeReader(fs)
        # NOTE: the registry lists the whole store every few seconds; see serve_app.storage.listing.
        self._lister: S3Lister | None = S3Lister(config) if fs is None else None
        self.root = config.root
        # NOTE: one pool per store bounds the GETs in flight across concurrent loads.
        self._pool = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="s3-fetch")

    # ----------------------------------------------------------------- paths
    def version_dir(self, model_id: str, version: str) -> str:
        """The store path of one version's folder."""
        return f"{self.root}/{model_id}/{version}"

    def manifest_path(self, model_id: str, version: str) -> str:
        """The store path of one version's manifest."""
        return f"{self.version_dir(model_id, version)}/{MANIFEST_NAME}"

    # ----------------------------------------------------------------- reads
    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (local stacks and tests)."""
        with storage_errors("creating the bucket"):
            if not self.fs.exists(self.config.bucket):
                self.fs.mkdir(self.config.bucket)

    def list_manifest_paths(self) -> list[str]:
        """Every published manifest under the root, from one recursive listing."""
        with storage_errors("listing models"):
            try:
                paths = self._list_root()
            except FileNotFoundError:
                return []
        out = []
        for path in paths:
            # NOTE: <root>/<model_id>/<version>/manifest.json, nothing deeper or shallower.
            rel = path.lstrip("/").removeprefix(self.root + "/").split("/")
            if len(rel) == 3 and rel[2] == MANIFEST_NAME:
                out.append(path)
        return sorted(out)

    def _list_root(self) -> list[str]:
        """`bucket/key` of every object under the root: the lean S3 lister when this store
        owns its S3 client, s3fs otherwise (an injected filesystem, or a store the lister
        could not list: a redirect to another region, say, which s3fs follows)."""
        if self._lister is None:
            return self.fs.find(self.root)
        bucket, _, prefix = self.root.partition("/")
        try:
            keys = self._lister.keys(bucket, f"{prefix}/" if prefix else "")
        except ListingFailed as exc:
            if exc.status >= 500:
                raise  # the store is in trouble, not our request: StorageUnavailable
            logger.warning(
                "lean listing refused; listing through s3fs from now on",
                extra={"status": exc.status, "code": exc.code},
            )
            self._lister = None
            return self.fs.find(self.root)
        return [f"{bucket}/{key}" for key in keys]

    def read_manifests(self, paths: list[str]) -> dict[str, Manifest]:
        """Read many manifests concurrently; unreadable or vanished ones are left out."""
        if not paths:
            return {}
        with storage_errors("reading manifests"):
            raw = self.fs.cat(paths, on_error="return")
        out: dict[str, Manifest] = {}
        for path, data in raw.items():
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):
                with storage_errors("reading manifests"):
                    raise data
            try:
                manifest = Manifest.model_validate_json(data)
            except ValueError:
                logger.warning("skipping invalid manifest", extra={"path": path})
                continue
            # NOTE: the path names the version; a manifest under a/1/ claiming b@1 is a forgery.
            if self.manifest_path(manifest.model_id, manifest.version) != path.lstrip("/"):
                logger.warning(
                    "skipping manifest whose id or version differs from its path",
                    extra={"path": path, "claims": manifest.key},
                )
                continue
            out[path] = manifest
        return out

    def read_manifest(self, model_id: str, version: str) -> Manifest:
        """Read one manifest by id and version (raises FileNotFoundError if absent)."""
        with storage_errors("reading a manifest"):
            raw = self.fs.cat_file(self.manifest_path(model_id, version))
        manifest = Manifest.model_validate_json(raw)
        if (manifest.model_id, manifest.version) != (model_id, version):
            raise ValueError(f"manifest of {model_id}@{version} claims to be {manifest.key}")
        return manifest

    def exists(self, model_id: str, version: str) -> bool:
        """Whether this version is published."""
        with storage_errors("checking a version"):
            return bool(self.fs.exists(self.manifest_path(model_id, version)))

    # ----------------------------------------------------------------- publish
    def publish(
        self, src_dir: Path, manifest: Manifest, progress: ProgressFn | None = None
    ) -> Manifest:
        """Upload the files of `manifest` from `src_dir`, then the manifest itself.

        Raises:
            VersionExists: the version is already published (versions are immutable).

        Two publishers of one version race safely: each first creates the version's claim
        object with a conditional PUT (`If-None-Match: *`), so exactly one uploads files;
        the manifest is written last, conditionally too. The claim stays (deleting it would
        let a later publisher overwrite the files of a published version).
        """
        exists = VersionExists(
            f"{manifest.model_id} version {manifest.version} is already published (or being "
            "published); versions are immutable, publish a new version instead"
        )
        if self.exists(manifest.model_id, manifest.version):
            raise exists
        self.ensure_bucket()
        base = self.version_dir(manifest.model_id, manifest.version)
        claim = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": now_iso()})
        with storage_errors("claiming the version"):
            if not self._create(f"{base}/{CLAIM_NAME}", claim.encode()):
                raise exists
        total, done = manifest.total_bytes, 0
        with storage_errors("uploading model files"):
            for entry in manifest.files:
                self.fs.put_file(str(src_dir / entry.path), f"{base}/{entry.path}")
                done += entry.size
                if progress:
                    progress(done, total)
            # NOTE: the manifest goes last; readers never see a half-published version.
            body = manifest.model_dump_json(indent=2).encode()
            if not self._create(self.manifest_path(manifest.model_id, manifest.version), body):
                raise exists
        logger.info(
            "published model",
            extra={"model_id": manifest.model_id, "version": manifest.version, "bytes": total},
        )
        return manifest

    def _create(self, path: str, data: bytes) -> bool:
        """Write `path` only if it does not exist yet; False if it did (S3 412)."""
        try:
            self.fs.pipe_file(path, data, mode="create")
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    # ----------------------------------------------------------------- fetch
    def check_sizes(self, manifest: Manifest, limit_bytes: int | None = None) -> None:
        """Refuse a manifest whose declared sizes would be unsafe to preallocate.

        Every file counts against `limit_bytes` (the replica's budget), and a non-weight file
        (config, tokenizer) may not exceed `store.max_aux_file_bytes`: the manifest comes
        from the bucket, which is untrusted input.

        Raises:
            ModelTooLarge: a file or the whole version is over its limit.
        """
        cap = self.config.max_aux_file_bytes
        for entry in manifest.files:
            if not entry.path.endswith(".safetensors") and entry.size > cap:
                raise ModelTooLarge(
                    f"{manifest.key}: {entry.path} declares {entry.size} bytes; non-weight "
                    f"files are capped at {cap} bytes (store.max_aux_file_bytes)"
                )
        if limit_bytes is not None and manifest.total_bytes > limit_bytes:
            raise ModelTooLarge(
                f"{manifest.key}: its files declare {manifest.total_bytes} bytes, more than "
                f"the {limit_bytes} bytes allowed"
            )

    def start_fetch(
        self, manifest: Manifest, order: list[str] | None = None, limit_bytes: int | None = None
    ) -> VersionFetch:
        """Start fetching every file of `manifest` into memory; see VersionFetch.

        `order` lists file paths to fetch first (the rest follow in manifest order).

        Raises:
            ModelTooLarge: see check_sizes (checked before any buffer is allocated).
        """
        self.check_sizes(manifest, limit_bytes)
        return VersionFetch(self, manifest, order or [])

    def fetch(self, manifest: Manifest, limit_bytes: int | None = None) -> dict[str, Buffer]:
        """Every file of `manifest` in memory (path -> buffer), verified by sha256.

        Raises:
            ModelTooLarge: a declared size is over its limit (nothing was allocated).
            ArtifactCorrupt: a file does not match its manifest sha256, or is missing.
            StorageUnavailable: the store could not be read, or the download timed out.
        """
        return self.start_fetch(manifest, limit_bytes=limit_bytes).wait()

    def close(self) -> None:
        """Stop the fetch pool (in-flight GETs finish)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


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


class VersionFetch:
    """The files of one version streaming from the store into preallocated buffers.

    Ranged GETs of `store.chunk_bytes` run on the store's pool (`store.max_concurrency` in
    flight, shared by every load of the replica), each read straight into its place in the
    file's buffer; each file is hashed while its chunks arrive, so verification needs no
    second pass. `wait(paths)` returns verified buffers for some files while the others
    are still arriving (the loader builds the tokenizer meanwhile). The whole download is
    bounded by `store.download_timeout_s`; the first failure cancels the remaining GETs.
    """

    def __init__(self, store: ModelStore, manifest: Manifest, order: list[str]) -> None:
        self.manifest = manifest
        self._store = store
        self._deadline = time.monotonic() + store.config.download_timeout_s
        self._cancelled = threading.Event()
        self._error: BaseException | None = None
        base = store.version_dir(manifest.model_id, manifest.version)
        entries = {e.path: e for e in manifest.files}
        paths = [p for p in order if p in entries] + [p for p in entries if p not in order]
        self.buffers = {p: host_buffer(entries[p].size) for p in paths}
        self._digests = {p: _StreamDigest(self.buffers[p]) for p in paths}
        self._futures: dict[str, list[Future[None]]] = {p: [] for p in paths}
        chunk = store.config.chunk_bytes
        for path in paths:
            view = memoryview(self.buffers[path])
            for start in range(0, entries[path].size, chunk):
                piece = view[start : start + chunk]
                self._futures[path].append(
                    store._pool.submit(self._read, path, f"{base}/{path}", start, piece)
                )

    def _read(self, path: str, key: str, start: int, view: memoryview) -> None:
        if self._cancelled.is_set():
            return
        try:
            self._store.reader.read_into(key, start, view, self._deadline)
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
            StorageUnavailable: the store failed, or the download passed its deadline.
        """
        paths = list(self.buffers) if paths is None else paths
        pending = [f for p in paths for f in self._futures[p]]
        remaining = max(0.0, self._deadline - time.monotonic())
        _, not_done = futures_wait(pending, timeout=remaining, return_when=FIRST_EXCEPTION)
        if self._error is not None:
            self.cancel()
            if isinstance(self._error, FileNotFoundError):
                raise ArtifactCorrupt(
                    f"{self.manifest.key}: a file of its manifest is missing from the store"
                ) from self._error
            with storage_errors("downloading model files"):
                raise self._error
        if not_done:
            self.cancel()
            raise StorageUnavailable(
                f"download of {self.manifest.key} exceeded store.download_timeout_s",
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

    def cancel(self) -> None:
        """Stop issuing this version's GETs (those in flight finish or fail on their own)."""
        self._cancelled.set()
        for futures in self._futures.values():
            for future in futures:
                future.cancel()


class DiskTier:
    """Local disk copies of downloaded versions, pruned oldest-used first past a byte budget."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, manifest: Manifest) -> Path:
        """The folder that holds this version's files."""
        return inside(self.root, manifest.model_id, manifest.version)

    def has(self, manifest: Manifest, paths: list[str] | None = None) -> bool:
        """Whether every file of this version (or those in `paths`) is on disk with its
        manifest size."""
        folder = self.path_for(manifest)
        return all(
            inside(folder, e.path).is_file() and inside(folder, e.path).stat().st_size == e.size
            for e in manifest.files
            if paths is None or e.path in paths
        )

    def read(self, manifest: Manifest) -> dict[str, Buffer] | None:
        """Every file of this version from disk, each read into a buffer of its size and
        hashed in the same pass; None if a file is missing, short or fails its sha256 (a
        corrupt copy is deleted). Needs no store: versions are immutable, so a verified disk
        copy serves reloads while S3 is down (stale-if-error)."""
        folder = self.path_for(manifest)
        buffers: dict[str, Buffer] = {}
        for entry in manifest.files:
            try:
                with inside(folder, entry.path).open("rb", buffering=0) as fh:
                    buffer = host_buffer(entry.size)
                    view, digest, done = memoryview(buffer), hashlib.sha256(), 0
                    while done < entry.size:
                        n = fh.readinto(view[done : done + _DISK_PIECE])
                        if not n:
                            break
                        digest.update(view[done : done + n])
                        done += n
            except FileNotFoundError:
                return None
            if done != entry.size or digest.hexdigest() != entry.sha256:
                logger.warning(
                    "disk tier copy is corrupt; dropping it",
                    extra={"key": manifest.key, "file": entry.path},
                )
                shutil.rmtree(folder, ignore_errors=True)
                return None
            buffers[entry.path] = buffer
        return buffers

    def write(self, manifest: Manifest, buffers: dict[str, Buffer], paths: list[str]) -> Path:
        """Write verified `buffers[path]` for `paths` into this version's folder (each
        through a temp file and a rename, so a half-written file is never taken as whole)."""
        folder = self.path_for(manifest)
        for path in paths:
            target = inside(folder, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(f"{target.name}.part-{os.getpid()}-{threading.get_ident()}")
            try:
                part.write_bytes(buffers[path])
                os.replace(part, target)
            finally:
                part.unlink(missing_ok=True)
        return folder

    def write_weak(
        self, manifest: Manifest, buffers: dict[str, Callable[[], Buffer | None]]
    ) -> bool:
        """Like `write`, for buffers held only through weak references (`buffers[path]()`
        returns the buffer or None once it is gone): written piece by piece, and abandoned,
        with nothing left behind, as soon as a buffer has been freed (its model evicted), so
        the disk copy never keeps a model's memory alive. True if every file was written."""
        folder = self.path_for(manifest)
        for path, ref in buffers.items():
            target = inside(folder, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(f"{target.name}.part-{os.getpid()}-{threading.get_ident()}")
            try:
                with part.open("wb", buffering=0) as fh:
                    done = 0
                    while True:
                        buffer = ref()
                        if buffer is None:
                            return False
                        if done >= len(buffer):
                            break
                        with memoryview(buffer) as view:
                            done += fh.write(view[done : done + _DISK_PIECE])
                        del buffer
                os.replace(part, target)
            finally:
                part.unlink(missing_ok=True)
        return True

    def touch(self, manifest: Manifest) -> None:
        """Mark a version as just used (its folder's mtime orders pruning)."""
        path = self.path_for(manifest)
        if path.exists():
            os.utime(path)

    def prune(self, keep: set[Path] | None = None) -> int:
        """Delete least-recently-used version folders until under budget; return bytes freed."""
        keep = keep or set()
        with self._lock:
            folders: list[tuple[float, int, Path]] = []
            for model_dir in self.root.iterdir():
                if not model_dir.is_dir():
                    continue
                for version_dir in model_dir.iterdir():
                    size = sum(f.stat().st_size for f in version_dir.rglob("*") if f.is_file())
                    folders.append((version_dir.stat().st_mtime, size, version_dir))
            used = sum(size for _, size, _ in folders)
            freed = 0
            for _, size, folder in sorted(folders):
                if used - freed <= self.budget_bytes:
                    break
                if folder in keep:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                freed += size
            return freed


def _precondition_failed(exc: OSError) -> bool:
    """Whether an s3fs error is S3's 412 for a conditional write (by error code, not text)."""
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__
    return isinstance(cause, ClientError) and (
        cause.response.get("Error", {}).get("Code") == "PreconditionFailed"
    )


def inside(root: Path, *parts: str) -> Path:
    """`root / parts`, refusing any result that resolves outside `root`.

    Manifests are validated on read (serve_app.storage.manifest); this is the second line of
    defence wherever a bucket-supplied name becomes a local path.
    """
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"refusing a path outside {root}: {'/'.join(parts)[:80]!r}")
    return path


def wait_for_store(store: ModelStore, timeout_s: float = 30.0) -> None:
    """Poll until the store answers a listing (used right after starting a local S3)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            store.ensure_bucket()
            store.list_manifest_paths()
            return
        except StorageUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
