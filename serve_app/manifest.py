"""The manifest of one immutable model version, and model id / version naming rules.

A manifest is the JSON file `<store>/<model_id>/<version>/manifest.json`. It is written last
when publishing, so a version is visible only once all of its files are in place.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import InvalidModelId, InvalidVersion

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MANIFEST_NAME = "manifest.json"

ModelFormat = Literal["hf-transformers", "torch-module"]
Task = Literal["tabular-classification", "text-classification", "text-embedding"]


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
    tags: list[str] = Field(
        default_factory=list, description="Free-form tags; pool rules can match them."
    )

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
