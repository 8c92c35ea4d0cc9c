"""Config: the shipped config.yaml validates; typos and bad values are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig, load_config, parse_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_yaml_is_valid() -> None:
    config = load_config(ROOT / "config.yaml")
    assert config.store.url == "s3://fleet/models"
    assert config.store.bucket == "fleet"
    assert config.host.memory_budget == 2**30
    assert config.host.accelerator == "auto"


def test_unknown_keys_are_rejected() -> None:
    with pytest.raises(ValidationError, match="memory_budgett"):
        AppConfig.model_validate({"host": {"memory_budgett": "1GiB"}})
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"hosts": {}})


def test_bad_accelerator_is_rejected() -> None:
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"host": {"accelerator": "tpu"}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [(1024, 1024), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5 GiB", int(1.5 * 2**30))],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_bad_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="size"):
        parse_bytes("lots")


def test_secrets_never_show_in_repr() -> None:
    config = AppConfig.model_validate({"store": {"secret_access_key": "hunter2"}})
    assert "hunter2" not in repr(config)
    assert "hunter2" not in config.model_dump_json()
