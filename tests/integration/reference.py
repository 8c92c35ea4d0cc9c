"""Reference answers: the demo models rebuilt locally and run directly with torch/transformers.

Nothing here uses fleetserve's loader or predictors: fraud models are rebuilt from their
seed and run as plain torch; text classifiers run through transformers; the embedder runs
through sentence-transformers.
"""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from devstack.demo_fleet import (
    DEFAULT_SEED,
    FRAUD_FEATURES,
    TEXT_CLASSIFIERS,
    minilm_dir,
    write_fraud_model,
    write_text_classifier,
)

TEXTS = ["the delivery was fast and friendly", "my refund is three weeks late!"]
_ROOT = Path(tempfile.mkdtemp(prefix="fleet-reference-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def rows_for(model_id: str, n: int = 3) -> list[list[float]]:
    rng = random.Random(model_id)
    return [[round(rng.uniform(-2, 2), 4) for _ in range(FRAUD_FEATURES)] for _ in range(n)]


def inputs_for(model_id: str) -> list[Any]:
    return rows_for(model_id) if model_id.startswith("fraud-") else TEXTS


@functools.cache
def _fraud_module(index: int) -> torch.nn.Module:
    from safetensors.torch import load_file

    from devstack.demo_fleet import fraud_spec
    from serve_app.loading.architectures import build_mlp

    folder = write_fraud_model(_ROOT / f"fraud-{index}", index, DEFAULT_SEED)
    module = build_mlp(fraud_spec(index, DEFAULT_SEED))
    module.load_state_dict(load_file(str(folder / "model.safetensors")))
    return module.eval()


@functools.cache
def _classifier(model_id: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = next(s for s in TEXT_CLASSIFIERS if s.model_id == model_id)
    folder = write_text_classifier(_ROOT / model_id, spec, DEFAULT_SEED)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


@functools.cache
def _embedder() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)


def expected(model_id: str, inputs: list[Any]) -> list[Any]:
    """What loading `model_id` directly and running it on `inputs` gives."""
    with torch.inference_mode():
        if model_id.startswith("fraud-merchant-"):
            module = _fraud_module(int(model_id.rsplit("-", 1)[1]))
            return torch.sigmoid(module(torch.tensor(inputs))[:, 0]).tolist()
        if model_id == "minilm-embed":
            return _embedder().encode(inputs, convert_to_numpy=True).tolist()
        model, tokenizer = _classifier(model_id)
        enc = tokenizer(inputs, padding=True, truncation=True, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits, dim=-1)
        labels = model.config.id2label
        return [{"label": labels[int(p.argmax())], "score": float(p.max())} for p in probs]


def assert_same(model_id: str, got: list[Any], want: list[Any]) -> None:
    """Served outputs equal the reference up to float noise from thread counts."""
    import pytest

    assert len(got) == len(want), model_id
    for g, w in zip(got, want, strict=True):
        if isinstance(w, dict):
            assert g["label"] == w["label"], model_id
            assert g["score"] == pytest.approx(w["score"], rel=1e-4, abs=1e-5), model_id
        else:
            assert g == pytest.approx(w, rel=1e-4, abs=1e-5), model_id
