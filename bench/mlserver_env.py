"""MLServer in its own virtualenv, for the warm-overhead baseline (bench/warm_overhead.py).

`ensure_mlserver()` creates `.state/mlserver-venv` (once) with `mlserver` and
`mlserver-huggingface` from PyPI. A constraint pins torch to exactly the project's version (the
CPU build here): no unpinned torch is ever installed. A `.pth` file appends the project
venv's site-packages for anything else. The MLServer venv's own packages (e.g. its fastapi<0.116 and
transformers 4.41) come first on sys.path. `mlserver-huggingface` is installed without its
declared `onnxruntime` dependency (a PyTorch pipeline does not use it), with the CPU build
of tensorflow (imported at module level), and `optimum` without extras.

`write_model_settings()` writes an MLServer model folder serving a local copy of
all-MiniLM-L6-v2 as a `feature-extraction` pipeline.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

VERSION = "1.7.1"
# NOTE: mlserver_huggingface imports tensorflow at module level (to set its thread counts),
# so the CPU build of tensorflow is needed even for a PyTorch pipeline.
PACKAGES = [
    f"mlserver=={VERSION}",
    "transformers==4.41.2",  # mlserver_huggingface imports `Conversation` (gone in 4.42)
    "optimum>=1.4,<2",
    "tensorflow-cpu>=2.16,<2.20",
    "tf-keras>=2.16,<2.20",
    "protobuf>=5.27.2,<6",  # tensorflow 2.19's range, and mlserver's
    "googleapis-common-protos<1.66",  # newer ones need protobuf 6
    "pillow",  # imported by mlserver_huggingface's codecs
]


class MLServerUnavailable(RuntimeError):
    """MLServer could not be installed or started here; the message says why."""


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise MLServerUnavailable(f"{what} failed: " + " | ".join(tail))


def ensure_mlserver(root: Path = Path(".state/mlserver-venv")) -> Path:
    """The `mlserver` executable of the MLServer venv, installing it if needed."""
    exe = root / "bin" / "mlserver"
    if exe.exists():
        return exe
    import torch

    _run([sys.executable, "-m", "venv", str(root)], "creating the MLServer venv")
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    ours = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    (root / "lib" / py / "site-packages" / "zz-fleet-torch.pth").write_text(ours + "\n")
    constraints = root / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c", str(constraints)]
    _run([*pip, *PACKAGES], f"pip install {' '.join(PACKAGES)}")
    _run(
        [*pip, "--no-deps", f"mlserver-huggingface=={VERSION}"],
        "pip install mlserver-huggingface",
    )
    if not exe.exists():
        raise MLServerUnavailable(f"pip installed mlserver but {exe} is missing")
    return exe


def write_model_settings(models_dir: Path, name: str, model_path: Path) -> Path:
    """An MLServer model folder `models_dir/name` serving `model_path` (feature-extraction)."""
    folder = models_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "name": name,
        "implementation": "mlserver_huggingface.HuggingFaceRuntime",
        "parameters": {
            "extra": {
                "task": "feature-extraction",
                "pretrained_model": str(model_path),
                "pretrained_tokenizer": str(model_path),
                "framework": "pt",
            }
        },
    }
    (folder / "model-settings.json").write_text(json.dumps(settings, indent=2))
    return folder
