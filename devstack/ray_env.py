"""The environment any Python process needs to reach the local, loopback-only Ray cluster.

Two Ray behaviours make a plain `ray.init()` (or `ray job submit`) in a new shell fail
against the cluster `fleetserve up` starts on 127.0.0.1:

- Ray rewrites a 127.0.0.1 cluster address to the machine's routable address unless
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`; the loopback GCS is not listening there, so the
  driver hangs.
- Ray clients send the auth token only with `RAY_AUTH_MODE=token`.

`fleetserve up` therefore installs a startup hook in this Python environment (a `.pth`
file and this module, copied into site-packages as `_fleetserve_ray_env`). At interpreter
start it sets those two variables, unless already set, and only while Ray's current
cluster (Ray's `ray_current_cluster` file, or `RAY_ADDRESS`) is on 127.0.0.1. A cluster on
a real address is left alone, so the hook never changes how a multi-node cluster is
reached. `fleetserve down` removes the hook.

This module is self-contained (standard library only): it runs at every interpreter
start, before anything else is importable.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from collections.abc import MutableMapping
from pathlib import Path

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
AUTH_ENV = {"RAY_AUTH_MODE": "token"}
HOOK_MODULE = "_fleetserve_ray_env"
HOOK_PTH = "fleetserve-ray-env.pth"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost"}


def _ray_temp_dir(environ: MutableMapping[str, str]) -> Path:
    """Ray's default temp dir (as ray._common.utils.get_default_ray_temp_dir finds it)."""
    if "RAY_TMPDIR" in environ:
        return Path(environ["RAY_TMPDIR"]) / "ray"
    if sys.platform.startswith("linux") and "TMPDIR" in environ:
        return Path(environ["TMPDIR"]) / "ray"
    return Path("/tmp/ray")


def current_cluster_address(environ: MutableMapping[str, str] | None = None) -> str | None:
    """`RAY_ADDRESS`, else the address in Ray's `ray_current_cluster` file, else None."""
    environ = os.environ if environ is None else environ
    address = environ.get("RAY_ADDRESS", "").strip()
    if address:
        return address
    try:
        return (_ray_temp_dir(environ) / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def is_loopback(address: str) -> bool:
    """Whether a Ray address (`host:port`, `ray://host:port`, `http://host:port`) is local."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in _LOOPBACK_HOSTS


def _token_available(environ: MutableMapping[str, str]) -> bool:
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    custom = environ.get("RAY_AUTH_TOKEN_PATH")
    try:
        path = Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"
        return path.is_file()
    except (RuntimeError, KeyError, OSError):  # no home directory to look in
        return False


def apply_local_cluster_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the loopback (and, with a token, auth) variables while the current Ray cluster
    is on 127.0.0.1; never overrides a variable already set. Returns what it set."""
    environ = os.environ if environ is None else environ
    address = current_cluster_address(environ)
    if address is None or not is_loopback(address):
        return {}
    wanted = dict(LOOPBACK_ENV)
    if _token_available(environ):
        wanted |= AUTH_ENV
    applied = {k: v for k, v in wanted.items() if k not in environ}
    environ.update(applied)
    return applied


def site_dir() -> Path:
    """This interpreter's site-packages (the venv's, in a venv)."""
    return Path(sysconfig.get_paths()["purelib"])


def install_hook(target: Path | None = None) -> Path:
    """Copy this module into `target` (site-packages) with a `.pth` that runs it at start."""
    target = site_dir() if target is None else target
    shutil.copyfile(__file__, target / f"{HOOK_MODULE}.py")
    pth = target / HOOK_PTH
    pth.write_text(f"import {HOOK_MODULE}; {HOOK_MODULE}.apply_local_cluster_env()\n")
    return pth


def uninstall_hook(target: Path | None = None) -> None:
    """Remove what `install_hook` wrote."""
    target = site_dir() if target is None else target
    for name in (HOOK_PTH, f"{HOOK_MODULE}.py"):
        (target / name).unlink(missing_ok=True)
    for cached in (target / "__pycache__").glob(f"{HOOK_MODULE}.*.pyc"):
        cached.unlink(missing_ok=True)
