"""The model store: immutable model versions in S3 (s3fs), published and fetched by manifest.

Layout under the store root (`s3://bucket/prefix`):

    <model_id>/<version>/manifest.json     written last: its presence publishes the version
    <model_id>/<version>/<file>            the files the manifest lists (size + sha256)

Reads of large files use parallel ranged GETs written straight into place on local disk,
and every file is checked against its sha256 before anything uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
from botocore.exceptions import BotoCoreError, ClientError

from serve_app.config import StoreConfig
from serve_app.errors import ArtifactCorrupt, StorageUnavailable, VersionExists
from serve_app.manifest import MANIFEST_NAME, FileEntry, Manifest, now_iso, sha256_file

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
CLAIM_NAME = ".claim"  # created first, conditionally, by the one publisher of a version

_STORAGE_ERRORS = (OSError, BotoCoreError, ClientError, TimeoutError)


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
                paths = self.fs.find(self.root)
            except FileNotFoundError:
                return []
        out = []
        for path in paths:
            # NOTE: <root>/<model_id>/<version>/manifest.json, nothing deeper or shallower.
            rel = path.lstrip("/").removeprefix(self.root + "/").split("/")
            if len(rel) == 3 and rel[2] == MANIFEST_NAME:
                out.append(path)
        return sorted(out)

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
    def download(self, manifest: Manifest, dest: Path) -> Path:
        """Fetch every file of `manifest` into `dest`, verified by sha256; return `dest`.

        The ranged GETs of all missing files run on one pool (`store.max_concurrency`
        at once), each written at its offset; then every file is hashed, in parallel.
        Files already in `dest` with the right size (the local disk tier) are re-verified
        instead of fetched. A file that fails its digest is deleted and raises
        ArtifactCorrupt; nothing unverified is left behind.
        """
        dest.mkdir(parents=True, exist_ok=True)
        base = self.version_dir(manifest.model_id, manifest.version)
        for entry in manifest.files:
            inside(dest, entry.path)
        missing = [
            e
            for e in manifest.files
            if not ((dest / e.path).exists() and (dest / e.path).stat().st_size == e.size)
        ]
        suffix = f".part-{os.getpid()}-{threading.get_ident()}"
        parts = {e.path: (dest / e.path).with_name((dest / e.path).name + suffix) for e in missing}
        try:
            self._fetch_files(base, missing, parts)
            for entry in missing:
                os.replace(parts[entry.path], dest / entry.path)
        finally:
            for part in parts.values():
                part.unlink(missing_ok=True)
        digests = list(self._pool.map(sha256_file, [dest / e.path for e in manifest.files]))
        for entry, digest in zip(manifest.files, digests, strict=True):
            if digest != entry.sha256:
                (dest / entry.path).unlink(missing_ok=True)
                raise ArtifactCorrupt(
                    f"{manifest.model_id} version {manifest.version}: file {entry.path} has "
                    f"sha256 {digest[:12]}…, manifest says {entry.sha256[:12]}…; not loaded"
                )
        return dest

    def fetch(self, manifest: Manifest) -> dict[str, bytearray]:
        """Every file of `manifest` in memory (path -> bytes), verified by sha256.

        Ranged GETs of all files run on the shared pool, each copied into its file's
        preallocated buffer; the buffers are hashed in parallel.

        Raises:
            ArtifactCorrupt: a file does not match its manifest sha256.
            StorageUnavailable: the store could not be read.
        """
        base = self.version_dir(manifest.model_id, manifest.version)
        chunk = self.config.chunk_bytes
        buffers = {e.path: bytearray(e.size) for e in manifest.files}
        jobs = [
            (e.path, start, min(start + chunk, e.size))
            for e in manifest.files
            for start in range(0, e.size, chunk)
        ]

        def fetch(job: tuple[str, int, int]) -> None:
            path, start, end = job
            data = self.fs.cat_file(f"{base}/{path}", start=start, end=end)
            if len(data) != end - start:
                raise ArtifactCorrupt(f"short read of {manifest.key}/{path}")
            memoryview(buffers[path])[start:end] = data

        with storage_errors("downloading model files"):
            for _ in self._pool.map(fetch, jobs):
                pass
        digests = self._pool.map(
            lambda e: hashlib.sha256(buffers[e.path]).hexdigest(), manifest.files
        )
        for entry, digest in zip(manifest.files, digests, strict=True):
            if digest != entry.sha256:
                raise ArtifactCorrupt(
                    f"{manifest.model_id} version {manifest.version}: file {entry.path} has "
                    f"sha256 {digest[:12]}…, manifest says {entry.sha256[:12]}…; not loaded"
                )
        return buffers

    def _fetch_files(self, base: str, entries: list[FileEntry], parts: dict[str, Path]) -> None:
        """Ranged GETs of every entry, all on one pool, written at their offsets."""
        chunk = self.config.chunk_bytes
        fds: dict[str, int] = {}
        try:
            jobs = []
            for entry in entries:
                part = parts[entry.path]
                part.parent.mkdir(parents=True, exist_ok=True)
                fds[entry.path] = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fds[entry.path], entry.size)
                jobs += [
                    (f"{base}/{entry.path}", fds[entry.path], start, min(start + chunk, entry.size))
                    for start in range(0, entry.size, chunk)
                ]

            def fetch(job: tuple[str, int, int, int]) -> int:
                path, fd, start, end = job
                data = self.fs.cat_file(path, start=start, end=end)
                if len(data) != end - start:
                    raise ArtifactCorrupt(f"short read of {path.rsplit('/', 3)[-3:]}")
                return os.pwrite(fd, data, start)

            with storage_errors("downloading model files"):
                for _ in self._pool.map(fetch, jobs):
                    pass
        finally:
            for fd in fds.values():
                os.close(fd)


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

    def has(self, manifest: Manifest) -> bool:
        """Whether every file of this version is on disk with its manifest size."""
        folder = self.path_for(manifest)
        return all(
            inside(folder, e.path).is_file() and inside(folder, e.path).stat().st_size == e.size
            for e in manifest.files
        )

    def write(self, manifest: Manifest, buffers: dict[str, bytearray], paths: list[str]) -> Path:
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

    Manifests are validated on read (serve_app.manifest); this is the second line of
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
