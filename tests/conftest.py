"""Test-suite setup shared by every tier."""

from __future__ import annotations

import os

# NOTE: Ray reads this once at import. "0" keeps a local Ray instance on 127.0.0.1 (its
# single-machine mode) instead of the machine's network address; it must be set before
# anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: object, items: list) -> None:
    """Mark tests by tier from their folder, so `-m unit` / `-m integration` select them."""
    import pytest

    for item in items:
        path = str(item.fspath)
        if "/tests/unit/" in path:
            item.add_marker(pytest.mark.unit)
        elif "/tests/integration/" in path and "unit" not in item.keywords:
            item.add_marker(pytest.mark.integration)
        elif "/tests/cluster/" in path:
            item.add_marker(pytest.mark.cluster)


def pytest_ignore_collect(collection_path: object, config: object) -> bool | None:
    """Collect tests/cluster only in a session of its own (`pytest -m cluster tests/cluster`):
    it starts its own multi-node Ray cluster, which cannot share a process with the single
    Ray instance of the integration session."""
    from pathlib import Path

    path = Path(str(collection_path))
    if path.name == "cluster" and path.parent.name == "tests":
        return config.getoption("markexpr").strip() != "cluster"  # type: ignore[attr-defined]
    return None
