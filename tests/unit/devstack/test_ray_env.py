"""The startup hook that lets any Python in the environment reach the loopback cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import ray_env


def _environ(tmp_path: Path, address: str | None, token: bool = True) -> dict[str, str]:
    (tmp_path / "ray").mkdir(exist_ok=True)
    if address is not None:
        (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
    token_path = tmp_path / "auth_token"
    if token:
        token_path.write_text("secret")
    return {"RAY_TMPDIR": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(token_path)}


def test_loopback_cluster_gets_loopback_and_auth_variables(tmp_path: Path) -> None:
    environ = _environ(tmp_path, "127.0.0.1:6379")
    applied = ray_env.apply_local_cluster_env(environ)
    assert applied == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    assert environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


@pytest.mark.parametrize("address", ["10.0.0.5:6379", None])
def test_other_clusters_are_left_alone(tmp_path: Path, address: str | None) -> None:
    environ = _environ(tmp_path, address)
    assert ray_env.apply_local_cluster_env(environ) == {}
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in environ


def test_user_settings_win_and_no_token_means_no_auth_mode(tmp_path: Path) -> None:
    environ = _environ(tmp_path, "127.0.0.1:6379", token=False)
    environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    assert ray_env.apply_local_cluster_env(environ) == {}
    environ = _environ(tmp_path, None) | {"RAY_ADDRESS": "ray://localhost:10001"}
    assert ray_env.apply_local_cluster_env(environ)["RAY_AUTH_MODE"] == "token"


def test_installed_hook_runs_at_interpreter_start(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    ray_env.install_hook(site)
    environ = _environ(tmp_path, "127.0.0.1:6379")
    code = (
        "import json, os, site; site.addsitedir(os.environ['SITE']); "
        "print(json.dumps({k: os.environ.get(k) for k in "
        "('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', 'RAY_AUTH_MODE')}))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        env={**environ, "SITE": str(site)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    ray_env.uninstall_hook(site)
    assert [p.name for p in site.rglob("*") if p.is_file()] == []
