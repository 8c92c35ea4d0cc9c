"""The disk tier: local disk copies of verified model versions, so a reload needs no S3.

Only buffers already verified against their manifest sha256 are written here, and every
read hashes the files again (a corrupt copy is dropped). Version folders are pruned least
recently used first past a byte budget. `inside` guards every local path built from a
bucket-supplied name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from serve_app.storage.fetch import Buffer, host_buffer
from serve_app.storage.manifest import Manifest

logger = logging.getLogger(__name__)

_DISK_PIECE = 16 * 2**20


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


def inside(root: Path, *parts: str) -> Path:
    """`root / parts`, refusing any result that resolves outside `root`.

    Manifests are validated on read (serve_app.storage.manifest); this is the second line of
    defence wherever a bucket-supplied name becomes a local path.
    """
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"refusing a path outside {root}: {'/'.join(parts)[:80]!r}")
    return path
