"""`fleetserve up` (head + one worker node), then Ray drivers and Ray jobs exactly as a user
types them.

After `up`, a new shell that only has this environment's bin on its PATH (no variables
from the test process) runs the README's handle example with plain `ray.init()`, and
submits it as a Ray job with the README's `ray job submit` line. Then `down` stops it all.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from devstack.serve_cli import serve_http_url

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


def _readme_block(lang: str, needle: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return next(b for b in re.findall(rf"```{lang}\n(.*?)```", readme, re.S) if needle in b)


def _fresh_shell_env() -> dict[str, str]:
    """What a new login shell with the venv activated has: HOME, PATH, locale, no more."""
    return {
        "HOME": os.environ["HOME"],
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "VIRTUAL_ENV": str(BIN.parent),
    }


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        env=_fresh_shell_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _check_hosts_span_the_nodes(state: Path) -> None:
    """config.yaml's two host replicas, deployed unchanged, sit on the head and the worker
    (Serve spreads replicas over nodes) and name them."""
    admin = {"Authorization": f"Bearer {(state / 'admin_key').read_text().strip()}"}
    url = f"{serve_http_url(ROOT / 'config.yaml')}/v1/replicas"
    replicas = httpx.get(url, headers=admin, timeout=30.0).json()
    assert len(replicas) == 2, replicas
    assert {r["node"] for r in replicas} == {"head", "worker-1"}, replicas


def _check_tenants_and_admin_key(fleetserve: str, state: Path) -> None:
    """`up --tenants` on the running stack: the three calls it prints answer 401, 403 and
    200; management needs the admin key that `up` generated, which the CLI sends."""
    up = _run(
        [fleetserve, "--state-dir", str(state), "up", "--count", "4", "--vision", "2", "--tenants"],
        ROOT,
        900,
    )
    assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
    keys = json.loads((state / "tenants.json").read_text())
    assert keys["text-team"] in up.stdout  # printed once, for the user to copy
    url = f"{serve_http_url(ROOT / 'config.yaml')}/v1/models/minilm-embed/predict"
    body = {"inputs": ["hi"]}

    def call(key: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(url, json=body, headers=headers, timeout=120.0)

    assert call(None).status_code == 401
    refused = call(keys["fraud-team"])
    assert refused.status_code == 403
    assert refused.json()["code"] == "out_of_scope"
    assert call(keys["text-team"]).status_code == 200

    admin_url = f"{serve_http_url(ROOT / 'config.yaml')}/v1/replicas"
    assert httpx.get(admin_url, timeout=30.0).status_code == 401
    load = _run([fleetserve, "--state-dir", str(state), "load", "fraud-merchant-0001"], ROOT, 300)
    assert load.returncode == 0, (load.stdout + load.stderr)[-3000:]


def test_fresh_shell_drivers_and_jobs_reach_the_local_stack(tmp_path: Path) -> None:
    state = tmp_path / "state"
    fleetserve = str(BIN / "fleetserve")
    # NOTE: with one worker node beside the head: config.yaml deploys unchanged on a
    # (local) multi-node cluster, and every step below runs against it.
    args = ["up", "--count", "4", "--vision", "2", "--workers", "1"]
    up = _run([fleetserve, "--state-dir", str(state), *args], ROOT, 900)
    try:
        assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
        _check_hosts_span_the_nodes(state)

        example = _readme_block("python", "get_app_handle")
        checks = (
            "\nassert scored.num_rows == 1000 and one['model_id'] == 'fraud-merchant-0003'"
            "\nprint('handle example ok')\n"
        )
        driver = _run([str(BIN / "python"), "-c", example + checks], tmp_path, 300)
        assert driver.returncode == 0, driver.stderr[-3000:]
        assert "handle example ok" in driver.stdout

        job_dir = tmp_path / "my_job"
        job_dir.mkdir()
        (job_dir / "job.py").write_text(example + checks)
        line = next(
            ln.strip()
            for ln in _readme_block("bash", "ray job submit").splitlines()
            if ln.strip().startswith("ray job submit")
        )
        job = _run(shlex.split(line), job_dir, 600)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "handle example ok" in job.stdout
        assert "succeeded" in job.stdout.lower()

        _check_tenants_and_admin_key(fleetserve, state)
    finally:
        down = _run([fleetserve, "--state-dir", str(state), "down"], ROOT, 300)
        assert down.returncode == 0, (down.stdout + down.stderr)[-3000:]
