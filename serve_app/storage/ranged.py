"""Range readers: one byte range of a stored object, read straight into a caller's buffer.

`S3RangeReader` issues one ranged GET per call with a plain (thread-safe) botocore client
and streams the response body into its place in the caller's buffer as each socket read
returns (no chunk-sized `bytes` object built and copied again, no join of parts), so a
trickling body is cut off at the caller's deadline and a silent one at the read timeout.
`FsspecRangeReader` serves any other fsspec filesystem (the in-memory one of the unit tests)
with `cat_file` ranges.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import fsspec

from serve_app.config import StoreConfig
from serve_app.errors import ArtifactCorrupt, StorageUnavailable

# NOTE: a body is read in pieces this size: the deadline is checked between pieces, and the
# temporary a piece passes through (urllib3 reads before it copies) stays cache-sized.
PIECE_BYTES = 2**20


Progress = Callable[[int], None]  # called with the bytes that just landed


class RangeReader(Protocol):
    """Reads `len(view)` bytes at `start` of `path` (`bucket/key`) into `view`."""

    def read_into(
        self,
        path: str,
        start: int,
        view: memoryview,
        deadline: float,
        progress: Progress | None = None,
    ) -> None:
        """Fill `view` exactly, or raise; `progress(n)` is called as each piece of n bytes
        lands (the fetch's stall watchdog, `store.stall_timeout_s`, watches it).

        Raises:
            FileNotFoundError: the object does not exist.
            ArtifactCorrupt: the object is shorter than the range.
            StorageUnavailable: `deadline` (time.monotonic) passed before the range arrived.
            OSError, BotoCoreError, ClientError: transport failures (the caller maps them).
        """
        ...


def _deadline_passed(path: str) -> StorageUnavailable:
    return StorageUnavailable(
        f"download of {path.rsplit('/', 3)[-3:]} exceeded store.download_timeout_s",
        retry_after_s=5.0,
    )


def s3_client(config: StoreConfig, **options: Any) -> Any:
    """A plain (thread-safe) botocore S3 client for `config`: its endpoint, region and keys
    (or the AWS_* variables), with `options` for botocore's `Config`."""
    import botocore.session
    from botocore.config import Config

    key = config.access_key_id.get_secret_value() if config.access_key_id else None
    secret = config.secret_access_key.get_secret_value() if config.secret_access_key else None
    endpoint = config.resolved_endpoint()
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=config.region or os.environ.get("AWS_REGION") or "us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(
            # NOTE: S3-compatible servers on an endpoint (SeaweedFS, MinIO) want paths.
            s3={"addressing_style": "path"} if endpoint else {},
            **options,
        ),
    )


class S3RangeReader:
    """Ranged GETs with botocore, bodies streamed into the caller's buffer."""

    def __init__(self, config: StoreConfig) -> None:
        self._client = s3_client(
            config,
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            retries={"max_attempts": config.retries + 1, "mode": "standard"},
            max_pool_connections=max(10, config.max_concurrency * 2),
        )

    def read_into(
        self,
        path: str,
        start: int,
        view: memoryview,
        deadline: float,
        progress: Progress | None = None,
    ) -> None:
        """One ranged GET of `path`, its body read into `view` (see RangeReader)."""
        from botocore.exceptions import ClientError

        if not len(view):
            return
        bucket, key = path.split("/", 1)
        try:
            response = self._client.get_object(
                Bucket=bucket, Key=key, Range=f"bytes={start}-{start + len(view) - 1}"
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(path) from exc
            if code == "InvalidRange":
                raise ArtifactCorrupt(f"{path}: shorter than its manifest size") from exc
            raise
        body = response["Body"]
        # NOTE: read1 on the urllib3 response under botocore's StreamingBody: it returns
        # whatever one socket read brings (readinto/read loop until the piece is full, which
        # a trickling server can stretch forever), so the deadline is checked between reads
        # and a silent socket still ends at the read timeout.
        raw = body._raw_stream
        try:
            done = 0
            while done < len(view):
                if time.monotonic() > deadline:
                    raise _deadline_passed(path)
                data = raw.read1(min(PIECE_BYTES, len(view) - done))
                if not data:
                    raise ArtifactCorrupt(f"{path}: short read at byte {start + done}")
                view[done : done + len(data)] = data
                done += len(data)
                if progress is not None:
                    progress(len(data))
        finally:
            body.close()


class FsspecRangeReader:
    """Ranges through any fsspec filesystem (one copy per range: for tests and odd stores)."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs

    def read_into(
        self,
        path: str,
        start: int,
        view: memoryview,
        deadline: float,
        progress: Progress | None = None,
    ) -> None:
        """`cat_file` of the range, copied into `view` (see RangeReader)."""
        if time.monotonic() > deadline:
            raise _deadline_passed(path)
        data = self.fs.cat_file(path, start=start, end=start + len(view))
        if len(data) != len(view):
            raise ArtifactCorrupt(f"{path}: short read at byte {start + len(data)}")
        view[:] = data
        if progress is not None:
            progress(len(data))
