"""Serve handles from a separate Ray job (driver process) connected to the running cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.reference import assert_same, expected, inputs_for
from tests.support import FleetApp, fraud_ids

ROOT = Path(__file__).resolve().parents[3]


def test_ray_job_gets_predictions_through_handles(
    app: FleetApp, ray_cluster: dict[str, Any]
) -> None:
    model_ids = [*fraud_ids()[10:22], "text-clf-topic", "minilm-embed"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.deployments.driver_job",
            ray_cluster["gcs_address"],
            *model_ids,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for model_id in model_ids:
        got = result["predictions"][model_id]
        assert got["model_id"] == model_id
        assert_same(model_id, got["outputs"], expected(model_id, inputs_for(model_id)))
    assert result["table_rows"] == 500
    assert result["table_columns"][-1] == "score"
    assert_same(model_ids[0], result["scores"], expected(model_ids[0], result["rows"]))
    assert result["error"] == {"code": "model_not_found", "status": 404}
