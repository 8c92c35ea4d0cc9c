"""`fleetserve publish` against the real S3: new versions, refusal of existing ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack.demo_fleet import write_fraud_model
from serve_app.cli import main
from serve_app.config import StoreConfig
from serve_app.storage.store import ModelStore


def test_publish_new_versions_and_refuse_existing(
    store: ModelStore, store_config: StoreConfig, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = write_fraud_model(tmp_path / "cli-model", 4)
    base = ["--store-url", store_config.url, "publish", str(src), "--model-id", "cli-model"]
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out) == {"model_id": "cli-model", "version": "1"}
    assert main(base) == 0  # no --version: the next number
    assert json.loads(capsys.readouterr().out)["version"] == "2"
    assert main([*base, "--version", "2"]) == 1  # versions are immutable
    assert "version_exists" in capsys.readouterr().err
    manifest = store.read_manifest("cli-model", "2")
    assert manifest.format == "torch-module"
    assert {f.path for f in manifest.files} == {"model.safetensors", "module.json"}


def test_publish_refuses_pickle_only_folder(
    store_config: StoreConfig, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (folder / "config.json").write_text("{}")
    args = ["--store-url", store_config.url, "publish", str(folder), "--model-id", "pickled"]
    assert main(args) == 1
    assert "safetensors" in capsys.readouterr().err
