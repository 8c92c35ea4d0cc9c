"""The model store: immutable model versions in S3, published and fetched by manifest.

Layout under the store root (`s3://bucket/prefix`):

    <model_id>/<version>/manifest.json     written last: its presence publishes the version
    <model_id>/<version>/<file>            the files the manifest lists (size + sha256)

Model files are read with parallel ranged GETs streamed straight into preallocated buffers
and hashed while they arrive (`serve_app.storage.fetch.VersionFetch`); nothing unverified is
handed out. Verified copies live in the local disk tier (`serve_app.loading.disk_tier`), which
serves reloads without S3.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
from botocore.exceptions import ClientError

from serve_app.config import StoreConfig
from serve_app.errors import ArtifactCorrupt, ModelTooLarge, StorageUnavailable, VersionExists
from serve_app.storage.fetch import Buffer, ByteClock, VersionFetch, storage_errors
from serve_app.storage.listing import ListingFailed, S3Lister
from serve_app.storage.manifest import MANIFEST_NAME, Manifest, now_iso
from serve_app.storage.ranged import FsspecRangeReader, RangeReader, S3RangeReader

# NOTE: `storage_errors` is defined with the fetch, which needs it too, but is part of this
# module's interface: code that reads or writes the store imports it from here.

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
CLAIM_NAME = ".claim"  # created first, conditionally, by the one publisher of a version


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
        self._manifest_sizes: dict[str, int] = {}  # manifest path -> size, last listing
        self.root = config.root
        # NOTE: one pool per store bounds the GETs in flight across concurrent loads.
        self._pool = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="s3-fetch")
        # NOTE: shared by every fetch of this store: see ByteClock.
        self._clock = ByteClock()

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
        """Every published manifest under the root, from one recursive listing (their
        listed sizes are kept for `read_manifests`, which skips oversized ones unread)."""
        with storage_errors("listing models"):
            try:
                listed = self._list_root()
            except FileNotFoundError:
                return []
        sizes = {}
        for path, size in listed:
            # NOTE: <root>/<model_id>/<version>/manifest.json, nothing deeper or shallower.
            rel = path.lstrip("/").removeprefix(self.root + "/").split("/")
            if len(rel) == 3 and rel[2] == MANIFEST_NAME:
                sizes[path] = size
        self._manifest_sizes = sizes
        return sorted(sizes)

    def _list_root(self) -> list[tuple[str, int]]:
        """(`bucket/key`, size) of every object under the root: the lean S3 lister when
        this store owns its S3 client, s3fs otherwise (an injected filesystem, or a store
        the lister could not list: a redirect to another region, say, which s3fs follows)."""
        if self._lister is None:
            return self._find_root()
        bucket, _, prefix = self.root.partition("/")
        try:
            objects = self._lister.objects(bucket, f"{prefix}/" if prefix else "")
        except ListingFailed as exc:
            if exc.status >= 500:
                raise  # the store is in trouble, not our request: StorageUnavailable
            logger.warning(
                "lean listing refused; listing through s3fs from now on",
                extra={"status": exc.status, "code": exc.code},
            )
            self._lister = None
            return self._find_root()
        return [(f"{bucket}/{key}", size) for key, size in objects]

    def _find_root(self) -> list[tuple[str, int]]:
        found = self.fs.find(self.root, detail=True)
        return [(path, int(info.get("size") or 0)) for path, info in found.items()]

    def _oversized(self, path: str, size: int) -> bool:
        """Whether a manifest of `size` bytes is over `store.max_manifest_bytes` (logged)."""
        if size <= self.config.max_manifest_bytes:
            return False
        logger.warning(
            "skipping oversized manifest",
            extra={"path": path, "bytes": size, "limit": self.config.max_manifest_bytes},
        )
        return True

    def read_manifests(self, paths: list[str]) -> dict[str, Manifest]:
        """Read many manifests concurrently; unreadable, vanished and oversized ones
        (`store.max_manifest_bytes`, by their listed size: never downloaded) are left out."""
        paths = [p for p in paths if not self._oversized(p, self._manifest_sizes.get(p, 0))]
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
            if self._oversized(path, len(data)):  # NOTE: listed smaller than it is
                continue
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
        """Read one manifest by id and version.

        Raises:
            FileNotFoundError: it is not published.
            ArtifactCorrupt: it is over `store.max_manifest_bytes` (never downloaded).
            StorageUnavailable: the store could not be read.
        """
        path = self.manifest_path(model_id, version)
        with storage_errors("reading a manifest"):
            size = int(self.fs.info(path).get("size") or 0)
            if self._oversized(path, size):
                raise ArtifactCorrupt(
                    f"the manifest of {model_id}@{version} is {size} bytes, over "
                    f"store.max_manifest_bytes ({self.config.max_manifest_bytes})"
                )
            raw = self.fs.cat_file(path)
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
        return VersionFetch(
            manifest,
            order or [],
            reader=self.reader,
            pool=self._pool,
            base=self.version_dir(manifest.model_id, manifest.version),
            chunk_bytes=self.config.chunk_bytes,
            timeout_s=self.config.download_timeout_s,
            stall_timeout_s=self.config.stall_timeout_s,
            clock=self._clock,
        )

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


def _precondition_failed(exc: OSError) -> bool:
    """Whether an s3fs error is S3's 412 for a conditional write (by error code, not text)."""
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__
    return isinstance(cause, ClientError) and (
        cause.response.get("Error", {}).get("Code") == "PreconditionFailed"
    )


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
