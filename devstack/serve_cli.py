"""Ray Serve on the local cluster, driven the way a user does: the real `serve deploy` and
`serve shutdown` CLI with token auth (`ray_cli_env`), and the Serve REST API behind the
dashboard to wait until an application runs and answers on its HTTP address.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import yaml

from devstack.ports import HOST
from devstack.ray_head import DASHBOARD_URL, ray_auth_headers, ray_cli_env, venv_tool
from devstack.state import StackError, say

APP_NAME = "fleet"
DEFAULT_SERVE_URL = f"http://{HOST}:8000"
APP_READY_TIMEOUT_S = 300.0
DEPLOY_TIMEOUT_S = 180.0
_POLL_S = 0.5


def serve_deploy(
    config_path: Path, dashboard_url: str = DASHBOARD_URL, timeout_s: float = DEPLOY_TIMEOUT_S
) -> None:
    """Run the real `serve deploy <config> -a <dashboard>` with token auth."""
    _run_cli(
        [venv_tool("serve"), "deploy", str(config_path), "-a", dashboard_url],
        what="serve deploy",
        timeout_s=timeout_s,
    )


def serve_shutdown(dashboard_url: str = DASHBOARD_URL, timeout_s: float = 120.0) -> None:
    """Run `serve shutdown -y -a <dashboard>` with token auth."""
    _run_cli(
        [venv_tool("serve"), "shutdown", "-y", "-a", dashboard_url],
        what="serve shutdown",
        timeout_s=timeout_s,
    )


def _run_cli(cmd: list[str], *, what: str, timeout_s: float) -> None:
    try:
        result = subprocess.run(
            cmd,
            env=ray_cli_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"`{what}` did not finish in {timeout_s:.0f}s") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout or "").strip()[-3000:]
        raise StackError(f"`{what}` failed (exit {result.returncode}):\n{tail}")


def serve_app_status(app_name: str = APP_NAME, dashboard_url: str = DASHBOARD_URL) -> dict:
    """The Serve REST API's view of one application (`{}` when it is not deployed)."""
    resp = httpx.get(
        f"{dashboard_url}/api/serve/applications/", headers=ray_auth_headers(), timeout=10.0
    )
    resp.raise_for_status()
    return (resp.json().get("applications") or {}).get(app_name) or {}


def wait_app_running(
    serve_url: str,
    app_name: str = APP_NAME,
    dashboard_url: str = DASHBOARD_URL,
    timeout_s: float = APP_READY_TIMEOUT_S,
) -> float:
    """Poll until `app_name` is RUNNING and `GET <serve_url>/healthz` answers 200.

    Returns:
        Seconds waited.

    Raises:
        StackError: the deploy failed or the deadline passed.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    last_status = ""
    while True:
        try:
            app = serve_app_status(app_name, dashboard_url)
        except httpx.HTTPError as exc:
            app = {"status": f"dashboard not answering ({type(exc).__name__})"}
        status = str(app.get("status") or "NOT_DEPLOYED")
        if status != last_status:
            say(f"app {app_name!r}: {status}")
            last_status = status
        if status == "DEPLOY_FAILED":
            raise StackError(
                f"deploying {app_name!r} failed: {app.get('message') or 'no message'}\n"
                f"(details: `serve status` or the dashboard at {dashboard_url})"
            )
        if status == "RUNNING" and _healthz_ok(serve_url):
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            raise StackError(
                f"{app_name!r} not serving after {timeout_s:.0f}s (status {status}); "
                f"see `serve status` and the dashboard at {dashboard_url}"
            )
        time.sleep(_POLL_S)


def _healthz_ok(serve_url: str) -> bool:
    try:
        return httpx.get(f"{serve_url}/healthz", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


def serve_http_url(config_path: Path) -> str:
    """The HTTP address the Serve config asks for (`http_options`), default 127.0.0.1:8000."""
    try:
        data = yaml.safe_load(Path(config_path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return DEFAULT_SERVE_URL
    options = data.get("http_options") or {}
    host = str(options.get("host") or HOST)
    if host in ("0.0.0.0", "::", ""):
        host = HOST
    return f"http://{host}:{int(options.get('port') or 8000)}"
