"""Model ids, versions and manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.errors import InvalidModelId, InvalidVersion
from serve_app.loading.disk_tier import DiskTier, inside
from serve_app.storage.manifest import (
    Manifest,
    validate_file_path,
    validate_model_id,
    validate_version,
    version_sort_key,
)


@pytest.mark.parametrize("good", ["a", "fraud-merchant-0001", "Model_1.2", "x" * 128, "9lives"])
def test_valid_ids(good: str) -> None:
    assert validate_model_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", "../x", "..", "a/b", "%2e%2e", "a..b", "-lead", ".hidden", "x" * 129, "a b", "é", "a\n"],
)
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(InvalidModelId) as info:
        validate_model_id(bad)
    assert info.value.status_code == 400


@pytest.mark.parametrize("bad", ["", "../1", "1/2", "v" * 65])
def test_invalid_versions(bad: str) -> None:
    with pytest.raises(InvalidVersion):
        validate_version(bad)


def test_versions_sort_numerically() -> None:
    assert sorted(["10", "2", "1"], key=version_sort_key) == ["1", "2", "10"]
    assert max(["beta", "3"], key=version_sort_key) == "3"


def _manifest(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model_id": "m",
        "version": "1",
        "format": "torch-module",
        "task": "tabular-classification",
        "files": [{"path": "model.safetensors", "size": 1, "sha256": "0" * 64}],
        "created_at": "2026-01-01T00:00:00+00:00",
    }
    return body | changes


def _file(path: str) -> dict[str, Any]:
    return {"path": path, "size": 1, "sha256": "0" * 64}


@pytest.mark.parametrize(
    "path",
    ["model.safetensors", "config.json", "1_Pooling/config.json", "vocab.txt", "spiece.model"],
)
def test_safe_file_paths_are_accepted(path: str) -> None:
    assert validate_file_path(path) == path
    Manifest.model_validate(_manifest(files=[_file(path)]))


@pytest.mark.parametrize(
    "path",
    [
        "../../x.safetensors",
        "/etc/x.json",
        "a/../b.json",
        "a/./b.json",
        "a//b.json",
        "..",
        "",
        "a\\\\..\\\\b.json",
        "weights.bin",
        "run.py",
        "manifest.json",
        "a/b/c/d/e.json",
        ".hidden.json",
    ],
)
def test_unsafe_file_paths_are_rejected(path: str) -> None:
    with pytest.raises(ValueError, match="invalid file path"):
        validate_file_path(path)
    with pytest.raises(ValidationError):
        Manifest.model_validate(_manifest(files=[_file(path)]))


@pytest.mark.parametrize(
    "changes",
    [
        {"model_id": "../x"},
        {"model_id": "a/b"},
        {"version": "../1"},
        {"version": "1/2"},
        {"files": [_file("a.json"), _file("a.json")]},
    ],
)
def test_unsafe_manifest_fields_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Manifest.model_validate(_manifest(**changes))


def test_local_paths_never_leave_their_root(tmp_path: Path) -> None:
    assert (
        inside(tmp_path, "m", "1", "1_Pooling/config.json")
        == tmp_path / "m/1/1_Pooling/config.json"
    )
    for parts in (("..", "x"), ("m", "../../x"), ("/etc/passwd",)):
        with pytest.raises(ValueError, match="outside"):
            inside(tmp_path, *parts)
    # a manifest that skipped validation still cannot steer the disk tier out of its root
    forged = Manifest.model_construct(**_manifest(model_id="..", version=".."))
    with pytest.raises(ValueError, match="outside"):
        DiskTier(tmp_path / "tier", 10**6).path_for(forged)
