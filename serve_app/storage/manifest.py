"""The manifest of one immutable model version, and model id / version naming rules.

A manifest is the JSON file `<store>/<model_id>/<version>/manifest.json`. It is written last
when publishing, so a version is visible only once all of its files are in place.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from serve_app.errors import InvalidModelId, InvalidVersion

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MANIFEST_NAME = "manifest.json"
# NOTE: a manifest comes from the bucket, which is untrusted input: its file paths become
# local paths (disk tier), so they are held to a strict shape here, once, for every reader.
FILE_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
MAX_FILE_DEPTH = 4
MAX_FILES = 256

ModelFormat = Literal["hf-transformers", "torch-module"]
Task = Literal[
    "tabular-classification",
    "text-classification",
    "text-embedding",
    "image-classification",
    "image-embedding",
]
IMAGE_TASKS = frozenset(
    {"image-classification", "image-embedding"}
)  # tasks whose inputs are images


def validate_model_id(model_id: str) -> str:
    """Return `model_id` if it is a valid id, else raise InvalidModelId (400).

    Ids never become S3 keys unless they pass this check, so `../x`, `%2e%2e` and slashes
    are rejected here.
    """
    if not isinstance(model_id, str) or not MODEL_ID_RE.fullmatch(model_id):
        shown = repr(model_id)[:60]
        raise InvalidModelId(
            f"invalid model id {shown}: use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    if model_id in {".", ".."} or ".." in model_id:
        raise InvalidModelId(f"invalid model id {model_id!r}: '..' is not allowed")
    return model_id


def validate_version(version: str) -> str:
    """Return `version` if it is a valid version name, else raise InvalidVersion (400)."""
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version) or ".." in version:
        raise InvalidVersion(
            f"invalid version {repr(version)[:60]}: use 1-64 characters from [A-Za-z0-9._-]"
        )
    return version


def validate_file_path(path: str) -> str:
    """Return `path` if it is a safe relative POSIX path for a model file, else raise
    ValueError: no absolute paths, no `..` or `.` parts, no backslashes or empty parts,
    at most MAX_FILE_DEPTH parts of [A-Za-z0-9._-], and a suffix from FILE_SUFFIXES."""
    parts = path.split("/")
    if not path or len(parts) > MAX_FILE_DEPTH or path == MANIFEST_NAME:
        raise ValueError(f"invalid file path {path[:80]!r}")
    for part in parts:
        if part in {"", ".", ".."} or not FILE_PART_RE.fullmatch(part) or ".." in part:
            raise ValueError(
                f"invalid file path {path[:80]!r}: use a relative path of [A-Za-z0-9._-] "
                "parts, without '..'"
            )
    if PurePosixPath(path).suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"invalid file path {path[:80]!r}: only {', '.join(FILE_SUFFIXES)} files are allowed"
        )
    return path


def version_sort_key(version: str) -> tuple[int, int, str]:
    """Order versions: numeric ones by value (2 < 10), then the rest by name."""
    if version.isdigit():
        return (1, int(version), "")
    return (0, 0, version)


class FileEntry(BaseModel):
    """One file of a model version: path relative to the version folder, size and digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _safe_path(cls, path: str) -> str:
        return validate_file_path(path)


class Manifest(BaseModel):
    """Everything needed to load and serve one model version, without listing S3."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_id: str
    version: str
    format: ModelFormat
    task: Task
    files: list[FileEntry]
    created_at: str
    framework: dict[str, str] = Field(default_factory=dict)
    architecture: dict[str, Any] | None = Field(
        None, description="For torch-module: the module description (no code, no pickle)."
    )
    task_options: dict[str, Any] = Field(default_factory=dict)
    labels: list[str] | None = None
    description: str = ""
    tags: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]] = Field(
        default_factory=list,
        max_length=32,
        description="Tags ([A-Za-z0-9._:-], up to 32); pool rules can match them.",
    )

    @field_validator("model_id")
    @classmethod
    def _valid_model_id(cls, model_id: str) -> str:
        if not MODEL_ID_RE.fullmatch(model_id) or ".." in model_id:
            raise ValueError(f"invalid model id {model_id[:60]!r}")
        return model_id

    @field_validator("version")
    @classmethod
    def _valid_version(cls, version: str) -> str:
        if not VERSION_RE.fullmatch(version) or ".." in version:
            raise ValueError(f"invalid version {version[:60]!r}")
        return version

    @field_validator("files")
    @classmethod
    def _distinct_files(cls, files: list[FileEntry]) -> list[FileEntry]:
        if len(files) > MAX_FILES:
            raise ValueError(f"too many files ({len(files)} > {MAX_FILES})")
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("file paths must be distinct")
        return files

    @property
    def key(self) -> str:
        """The cache and routing key of this version: `model_id@version`."""
        return f"{self.model_id}@{self.version}"

    @property
    def total_bytes(self) -> int:
        """Bytes of all files (a size hint; resident size is measured after load)."""
        return sum(f.size for f in self.files)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the safetensors files: the best guess of resident size before a load."""
        return sum(f.size for f in self.files if f.path.endswith(".safetensors"))


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def now_iso() -> str:
    """Current UTC time in ISO 8601 (the manifest's created_at)."""
    return datetime.now(UTC).isoformat(timespec="seconds")
