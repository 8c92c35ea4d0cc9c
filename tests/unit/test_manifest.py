"""Model ids, versions and manifests."""

from __future__ import annotations

import pytest

from serve_app.errors import InvalidModelId, InvalidVersion
from serve_app.manifest import validate_model_id, validate_version, version_sort_key


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
