"""The publisher: a local model folder -> a manifest -> an immutable version in the store.

Two source layouts are accepted:

- a Hugging Face transformers folder (`config.json`, `*.safetensors`, tokenizer files;
  a sentence-transformers folder makes a `text-embedding` model);
- a torch module folder: `model.safetensors` plus `module.json` with
  `{"task": ..., "architecture": {"kind": "mlp", ...}}` (see serve_app.loading.architectures).

Pickle-based weights (`.bin`, `.pt`, `.pkl`, ...) and code files are never published.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_app import __version__
from serve_app.errors import BadRequest
from serve_app.storage.manifest import (
    FILE_SUFFIXES,
    IMAGE_TASKS,
    FileEntry,
    Manifest,
    Task,
    now_iso,
    sha256_file,
    validate_model_id,
    validate_version,
)
from serve_app.storage.store import ModelStore, ProgressFn, storage_errors
from serve_app.vision.processing import DEFAULT_TOP_K, PROCESSOR_FILE, ImageProcessing

logger = logging.getLogger(__name__)

MODULE_SPEC = "module.json"
_NEVER_PUBLISHED = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".py", ".pyc"}
_SKIPPED_NAMES = {"README.md", ".gitattributes", "data_config.json"}


def framework_versions() -> dict[str, str]:
    """Versions of the libraries that produced (and should load) an artifact."""
    import safetensors
    import torch

    versions = {
        "fleetserve": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
    }
    try:
        import transformers
    except ImportError:
        return versions
    versions["transformers"] = transformers.__version__
    return versions


def build_manifest(
    src: Path,
    model_id: str,
    version: str,
    task: Task | None = None,
    description: str = "",
    tags: list[str] | None = None,
    top_k: int | None = None,
) -> Manifest:
    """Describe the folder `src` as a manifest (files hashed with sha256); `top_k` sets
    how many labels an image classifier answers with (default 5).

    Raises:
        BadRequest: the folder is not a publishable model.
    """
    validate_model_id(model_id)
    validate_version(version)
    if not src.is_dir():
        raise BadRequest(f"{src} is not a folder")
    files = _collect_files(src)
    if not any(f.path.endswith(".safetensors") for f in files):
        raise BadRequest(f"{src} has no .safetensors weights (pickle formats are not accepted)")
    common: dict[str, Any] = {
        "model_id": model_id,
        "version": version,
        "files": files,
        "created_at": now_iso(),
        "framework": framework_versions(),
        "description": description,
        "tags": list(tags or []),
    }
    if (src / MODULE_SPEC).exists():
        spec = json.loads((src / MODULE_SPEC).read_text())
        return Manifest(
            format="torch-module",
            task=task or spec.get("task", "tabular-classification"),
            architecture=spec["architecture"],
            labels=spec.get("labels"),
            **common,
        )
    if not (src / "config.json").exists():
        raise BadRequest(f"{src} has neither config.json (transformers) nor {MODULE_SPEC}")
    config = json.loads((src / "config.json").read_text())
    if config.get("auto_map"):
        raise BadRequest("models that need custom code (auto_map) are not accepted")
    inferred, options = _infer_hf_task(src, config)
    if task == "image-embedding" and inferred == "image-classification":
        options = {"normalize": True}
    elif task is not None and task != inferred and task in IMAGE_TASKS:
        raise BadRequest(f"task {task} needs an image classifier (*ForImageClassification)")
    task = task or inferred
    if top_k is not None:
        if task != "image-classification" or top_k < 1:
            raise BadRequest("top_k is a positive number of labels, for image classifiers")
        options = {**options, "top_k": top_k}
    labels = None
    if task in ("text-classification", "image-classification"):
        id2label = config.get("id2label") or {}
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)] or None
    return Manifest(
        format="hf-transformers", task=task, task_options=options, labels=labels, **common
    )


def _collect_files(src: Path) -> list[FileEntry]:
    entries = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        if path.name in _SKIPPED_NAMES or any(part.startswith(".") for part in rel.split("/")):
            continue
        if path.suffix in _NEVER_PUBLISHED:
            logger.warning("not publishing pickle or code file", extra={"file": rel})
            continue
        if path.suffix not in FILE_SUFFIXES:
            logger.warning("not publishing file of an unknown kind", extra={"file": rel})
            continue
        entries.append(FileEntry(path=rel, size=path.stat().st_size, sha256=sha256_file(path)))
    return entries


def _infer_hf_task(src: Path, config: dict[str, Any]) -> tuple[Task, dict[str, Any]]:
    modules_file = src / "modules.json"
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        kinds = [m.get("type", "") for m in modules]
        pooling = {}
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                pooling = json.loads((src / m["path"] / "config.json").read_text())
        if pooling and not pooling.get("pooling_mode_mean_tokens", False):
            raise BadRequest("only mean-pooling sentence-transformers models are supported")
        return "text-embedding", {
            "pooling": "mean",
            "normalize": any(k.endswith("Normalize") for k in kinds),
        }
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "text-classification", {}
    if any(a.endswith("ForImageClassification") for a in architectures):
        return "image-classification", _image_options(src, config)
    raise BadRequest("cannot tell the task of this model: pass --task")


def _image_options(src: Path, config: dict[str, Any]) -> dict[str, Any]:
    """An image classifier's task options; its preprocessor settings must be servable."""
    try:
        ImageProcessing.from_config(json.loads((src / PROCESSOR_FILE).read_text()))
    except FileNotFoundError as exc:
        raise BadRequest(f"an image classifier needs its {PROCESSOR_FILE}") from exc
    except ValueError as exc:
        raise BadRequest(f"{PROCESSOR_FILE}: {exc}") from exc
    labels = len(config.get("id2label") or {}) or 1
    return {"top_k": min(DEFAULT_TOP_K, labels)}


def next_version(store: ModelStore, model_id: str) -> str:
    """One more than the highest numeric version of `model_id` in the store ("1" if none)."""
    with storage_errors("listing versions"):
        try:
            names = [p.rsplit("/", 1)[-1] for p in store.fs.ls(f"{store.root}/{model_id}")]
        except FileNotFoundError:
            names = []
    numeric = [int(n) for n in names if n.isdigit()]
    return str(max(numeric, default=0) + 1)


def publish_path(
    store: ModelStore,
    src: Path,
    model_id: str,
    version: str | None = None,
    task: Task | None = None,
    description: str = "",
    progress: ProgressFn | None = None,
    tags: list[str] | None = None,
    top_k: int | None = None,
) -> Manifest:
    """Publish the folder `src` as `model_id` (next numeric version unless `version` given),
    with optional manifest `tags` (pool rules can match them) and an image classifier's
    `top_k`.

    Raises:
        VersionExists: that version is already published.
    """
    version = version or next_version(store, validate_model_id(model_id))
    manifest = build_manifest(src, model_id, version, task, description, tags, top_k)
    return store.publish(src, manifest, progress)


def print_progress(label: str) -> Callable[[int, int], None]:
    """A progress callback that rewrites one stderr line: `label  12.0/40.0 MB  30%`."""

    def report(done: int, total: int) -> None:
        pct = 100 * done / total if total else 100
        end = "\n" if done >= total else ""
        print(
            f"\r  {label:<32} {done / 1e6:8.1f}/{total / 1e6:.1f} MB {pct:5.1f}%",
            end=end,
            file=sys.stderr,
            flush=True,
        )

    return report
