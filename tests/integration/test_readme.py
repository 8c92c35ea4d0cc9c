"""The README's handle example runs as written against the running cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.conftest import FleetApp

ROOT = Path(__file__).resolve().parents[2]


def test_readme_handle_example_runs(app: FleetApp, ray_cluster: dict[str, Any]) -> None:
    readme = (ROOT / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "get_app_handle" in b
    )
    script = block + "\nassert scored.column_names[-1] == 'score' and scored.num_rows == 1000\n"
    script += "assert len(scores) == 2 and one['model_id'] == 'fraud-merchant-0003'\nprint('ok')\n"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster["gcs_address"])
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
