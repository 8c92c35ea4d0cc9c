"""The quickstart notebook: stored clean, and executed end to end against the real stack.

The notebook runs in a Jupyter kernel of this interpreter (the venv's python, through a
kernelspec written to a temporary JUPYTER_PATH, never installed system-wide), with cwd
`notebooks/`, and gets the session's stack through the same variables a user would set:
FLEET_URL, RAY_ADDRESS, FLEET_STORE_URL and the AWS_* variables.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode

from devstack.seaweed import SeaweedServer
from serve_app.config import StoreConfig
from tests.support import FleetApp

ROOT = Path(__file__).resolve().parents[3]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "fleetserve-test-python"
CELL_TIMEOUT_S = 300
STATS_TAG = "stats-table"
PLOT_TAG = "latency-plot"
_PROBE = "import sys; print('KERNEL-PYTHON=' + sys.executable)"


def read_notebook() -> NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def tagged(nb: NotebookNode, tag: str) -> NotebookNode:
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def output_text(cell: NotebookNode) -> str:
    """Everything a code cell showed as text: streams and text/plain or text/html data."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.extend(str(out.data.get(m, "")) for m in ("text/plain", "text/html"))
    return "\n".join(parts)


def install_kernelspec(jupyter_dir: Path) -> None:
    """A kernelspec under `jupyter_dir/kernels` that starts this very interpreter."""
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fleetserve tests (venv python)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


@pytest.mark.unit
def test_committed_notebook_is_clean() -> None:
    """Stored without outputs or execution counts, with the cells the run test checks."""
    nb = read_notebook()
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], f"cell {cell.get('id')} has stored outputs"
        assert cell.execution_count is None, f"cell {cell.get('id')} has an execution count"
    assert any(c.cell_type == "markdown" for c in nb.cells)
    assert "format_stats" in tagged(nb, STATS_TAG).source
    assert "matplotlib" in tagged(nb, PLOT_TAG).source


@pytest.mark.integration
def test_quickstart_notebook_runs_against_the_stack(
    app: FleetApp,
    ray_cluster: dict[str, Any],
    store_config: StoreConfig,
    s3: SeaweedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jupyter_dir = tmp_path / "jupyter"
    install_kernelspec(jupyter_dir)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    env = {
        **os.environ,
        **s3.env(),
        "FLEET_URL": app.url,
        "RAY_ADDRESS": ray_cluster["gcs_address"],
        "FLEET_STORE_URL": store_config.url,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    env.pop("MPLBACKEND", None)  # the kernel's inline backend renders the plot

    nb = read_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(_PROBE, id="kernel-python-probe"))
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    started = time.monotonic()
    try:
        client.execute(env=env)  # raises CellExecutionError naming the failing cell
    finally:
        nbformat.write(nb, tmp_path / "quickstart.executed.ipynb")
    print(f"\nquickstart notebook executed in {time.monotonic() - started:.1f}s")

    assert f"KERNEL-PYTHON={sys.executable}" in output_text(nb.cells[-1])
    stats = output_text(tagged(nb, STATS_TAG))
    assert "p50" in stats, stats
    assert "qs-fraud-" in stats, stats  # the model the notebook published is in the table
    assert "fraud-merchant-0000" in stats, stats
    plots = [
        out
        for out in tagged(nb, PLOT_TAG).outputs
        if out.output_type == "display_data" and "image/png" in out.data
    ]
    assert plots, f"no image output from the plot cell: {tagged(nb, PLOT_TAG).outputs}"
