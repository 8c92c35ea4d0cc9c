"""The local stack's keys: generated once (mode 0600) and reused; the `--tenants` config
holds only hashes and validates; the printed calls use the keys they should."""

from __future__ import annotations

import stat
from pathlib import Path

from devstack import credentials
from serve_app.auth.keys import hash_key
from serve_app.auth.tenants import Tenants
from serve_app.cli import admin_key
from serve_app.config import load_config

ROOT = Path(__file__).resolve().parents[3]


def test_admin_key_is_generated_once_privately(tmp_path: Path) -> None:
    key = credentials.ensure_admin_key(tmp_path)
    path = tmp_path / credentials.ADMIN_KEY_FILE
    assert len(key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert credentials.ensure_admin_key(tmp_path) == key
    assert admin_key(None, str(tmp_path)) == key  # what the CLI sends
    assert admin_key("given", str(tmp_path)) == "given"


def test_tenant_config_holds_hashes_only_and_deploys(tmp_path: Path, monkeypatch: object) -> None:
    keys = credentials.ensure_demo_tenants(tmp_path)
    assert set(keys) == {"fraud-team", "text-team"}
    assert credentials.ensure_demo_tenants(tmp_path) == keys
    assert stat.S_IMODE((tmp_path / credentials.TENANTS_FILE).stat().st_mode) == 0o600
    path = credentials.write_tenant_config(ROOT / "config.yaml", tmp_path, keys)
    text = path.read_text()
    assert all(key not in text for key in keys.values())
    config = load_config(path)
    assert [t.name for t in config.auth.tenants] == ["fraud-team", "text-team"]
    assert config.store == load_config(ROOT / "config.yaml").store
    tenants = Tenants(config.auth, None, manifests=None, is_alias=lambda _: False)  # type: ignore[arg-type]
    assert tenants.authenticate(keys["text-team"]).name == "text-team"
    assert config.auth.tenants[0].key_hashes == [hash_key(keys["fraud-team"])]


def test_summary_shows_a_401_a_403_and_a_200(tmp_path: Path) -> None:
    keys = {"fraud-team": "f" * 43, "text-team": "t" * 43}
    lines = [ln for ln in credentials.tenant_summary("http://h", keys, tmp_path) if "curl" in ln]
    assert len(lines) == 3
    assert "Bearer" not in lines[0]
    assert lines[0].endswith("# 401: no key")
    assert "f" * 43 in lines[1]
    assert "403" in lines[1]
    assert "t" * 43 in lines[2]
    assert lines[2].endswith("# 200")
