"""Models whose tokenizer files have the same sha256 digests share one tokenizer (issue 16,
"Loads must not starve warm requests"): real models published to an in-memory store, loaded
by the real loader, with the real all-MiniLM-L6-v2 tokenizer. Builds are counted by a spy on
`AutoTokenizer.from_pretrained` that calls the real thing."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from devstack.demo_fleet import TEXT_CLASSIFIERS, minilm_dir, write_text_classifier
from serve_app.config import StoreConfig
from serve_app.errors import ArtifactCorrupt
from serve_app.host.predictor import TextClassifier, TextEmbedder
from serve_app.loading.disk_tier import DiskTier
from serve_app.loading.loader import ModelLoader
from serve_app.loading.tokenizer_shelf import TokenizerKey, TokenizerShelf
from serve_app.storage.manifest import Manifest
from serve_app.storage.publisher import publish_path
from serve_app.storage.store import ModelStore

NEW_TOKEN = "fleetserveword"
TEXTS = [
    "the quick brown fox",
    f"a {NEW_TOKEN} in a sentence",
    "short",
    "a much longer text that goes on " * 200,  # truncated at max_length
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, dict[str, Manifest]]:
    """Two small classifiers and the real minilm embedder, all with minilm's tokenizer
    files; a second version of one; and a classifier whose tokenizer has one token more."""
    root = tmp_path_factory.mktemp("shelf")
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    store = ModelStore(StoreConfig(url="s3://fleet/unit-shelf", chunk_bytes=2**20), fs=fs)
    spec = TEXT_CLASSIFIERS[0]
    other = replace(spec, model_id="clf-b", labels=("no", "maybe", "yes"))
    manifests = {
        "a1": publish_path(store, write_text_classifier(root / "a1", spec, 1), "clf-a", "1"),
        "a2": publish_path(store, write_text_classifier(root / "a2", spec, 2), "clf-a", "2"),
        "b": publish_path(store, write_text_classifier(root / "b", other, 3), "clf-b", "1"),
    }
    extra = write_text_classifier(root / "extra", spec, 4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(extra))
    tokenizer.add_tokens([NEW_TOKEN])
    tokenizer.save_pretrained(str(extra))
    manifests["extra"] = publish_path(store, extra, "clf-extra", "1")
    shutil.copytree(minilm_dir(), root / "embed")
    manifests["embed"] = publish_path(store, root / "embed", "minilm-embed", "1")
    return store, manifests


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Folders that `AutoTokenizer.from_pretrained` built a tokenizer from."""
    built: list[str] = []
    real = transformers.AutoTokenizer.from_pretrained

    def counted(path: str, *args: Any, **kwargs: Any) -> Any:
        built.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counted)
    return built


@pytest.fixture
def loader(fleet: tuple[ModelStore, dict[str, Manifest]], tmp_path: Path) -> Iterator[ModelLoader]:
    loader = ModelLoader(fleet[0], DiskTier(tmp_path / "disk", 2**30), torch.device("cpu"))
    yield loader
    loader.close()


def _load(loader: ModelLoader, manifest: Manifest) -> Any:
    predictor = loader.load(manifest)
    assert isinstance(predictor, TextClassifier | TextEmbedder)
    return predictor


def _shared(predictor: Any) -> object:
    assert predictor.tokenizer is not None
    return predictor.tokenizer.shared


def test_same_tokenizer_files_share_one_tokenizer_built_once(
    fleet: tuple[ModelStore, dict[str, Manifest]], loader: ModelLoader, builds: list[str]
) -> None:
    manifests = fleet[1]
    a1, a2, b = (_load(loader, manifests[k]) for k in ("a1", "a2", "b"))
    embed = _load(loader, manifests["embed"])  # another task, config by transformers 4.8
    assert len(builds) == 1
    assert _shared(a1) is _shared(a2) is _shared(b) is _shared(embed)
    assert loader.tokenizers.stats() == {"in_use": 1, "idle": 0, "builds": 1, "reuses": 3}


def test_one_token_more_is_another_tokenizer(
    fleet: tuple[ModelStore, dict[str, Manifest]], loader: ModelLoader, builds: list[str]
) -> None:
    a1 = _load(loader, fleet[1]["a1"])
    extra = _load(loader, fleet[1]["extra"])
    assert len(builds) == 2
    assert _shared(a1) is not _shared(extra)
    plain = a1.tokenizer.encode([TEXTS[1]], 512)["input_ids"]
    added = extra.tokenizer.encode([TEXTS[1]], 512)["input_ids"]
    assert added.shape[1] < plain.shape[1]  # the new word is one token there


def test_shared_outputs_equal_an_unshared_load(
    fleet: tuple[ModelStore, dict[str, Manifest]], loader: ModelLoader, tmp_path: Path
) -> None:
    manifests = fleet[1]
    shared = [_load(loader, manifests[k]) for k in ("a1", "b", "embed")]
    assert len({id(_shared(p)) for p in shared}) == 1
    for n, predictor in enumerate(shared):
        expected = _reference(fleet[0], predictor.manifest, tmp_path / str(n))
        assert predictor.predict(TEXTS) == expected


def test_concurrent_predictions_through_one_tokenizer_never_raise(
    fleet: tuple[ModelStore, dict[str, Manifest]], loader: ModelLoader
) -> None:
    a1, b = _load(loader, fleet[1]["a1"]), _load(loader, fleet[1]["b"])
    assert _shared(a1) is _shared(b)
    expected = {id(a1): a1.predict(TEXTS), id(b): b.predict(TEXTS)}
    start = threading.Barrier(8)

    def hammer(n: int) -> None:
        start.wait()
        for i in range(40):
            predictor = (a1, b)[(n + i) % 2]
            texts = TEXTS[i % 4 :] + TEXTS[: i % 4]  # padding and truncation every call
            out = predictor.predict(texts)
            assert out == expected[id(predictor)][i % 4 :] + expected[id(predictor)][: i % 4]

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(hammer, n) for n in range(8)]:
            future.result()


def test_evicting_one_model_leaves_the_other_working_and_the_shelf_keeps_it(
    fleet: tuple[ModelStore, dict[str, Manifest]],
    loader: ModelLoader,
    builds: list[str],
    tmp_path: Path,
) -> None:
    manifests = fleet[1]
    a1, b = _load(loader, manifests["a1"]), _load(loader, manifests["b"])
    expected = b.predict(TEXTS)
    tokenizer = _shared(b)
    a1.close()
    assert b.predict(TEXTS) == expected
    assert loader.tokenizers.stats()["in_use"] == 1
    b.close()
    assert loader.tokenizers.stats()["in_use"] == 0
    assert loader.tokenizers.stats()["idle"] == 1
    again = _load(loader, manifests["a2"])  # a copy loaded after every user was evicted
    assert _shared(again) is tokenizer
    assert len(builds) == 1
    assert again.predict(TEXTS) == _reference(fleet[0], manifests["a2"], tmp_path / "ref")


def _reference(store: ModelStore, manifest: Manifest, root: Path) -> list[Any]:
    """`manifest`'s predictions from a fresh loader (a tokenizer built for it alone)."""
    alone = ModelLoader(store, DiskTier(root, 2**30), torch.device("cpu"))
    try:
        return _load(alone, manifest).predict(TEXTS)
    finally:
        alone.close()


def test_a_failed_load_releases_its_tokenizer(
    fleet: tuple[ModelStore, dict[str, Manifest]], loader: ModelLoader, tmp_path: Path
) -> None:
    src = write_text_classifier(tmp_path / "bad", TEXT_CLASSIFIERS[0], 5)
    weights = src / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("word_embeddings.weight"))
    state[name] = state[name][:100].contiguous()  # the tokenizer builds, the model does not
    save_file(state, str(weights))
    bad = publish_path(fleet[0], src, "clf-bad", "1")
    with pytest.raises(ArtifactCorrupt):
        loader.load(bad)
    assert loader.tokenizers.stats() == {"in_use": 0, "idle": 1, "builds": 1, "reuses": 0}


def _key(n: int) -> TokenizerKey:
    return TokenizerKey((("tokenizer.json", f"{n:064x}"),), ("BertConfig", "bert", None, None))


def _build() -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def test_the_shelf_keeps_a_bounded_lru_of_released_tokenizers(builds: list[str]) -> None:
    shelf = TokenizerShelf(keep=2)
    leases = [shelf.acquire(_key(n), _build) for n in range(3)]
    first = leases[0].shared
    for lease in leases:
        lease.release()
        lease.release()  # idempotent
    assert shelf.stats() == {"in_use": 0, "idle": 2, "builds": 3, "reuses": 0}
    assert shelf.acquire(_key(2), _build).shared is leases[2].shared  # kept
    assert shelf.acquire(_key(0), _build).shared is not first  # dropped: built again
    assert len(builds) == 4


def test_a_tokenizer_in_use_outlives_the_lru() -> None:
    shelf = TokenizerShelf(keep=0)
    held = shelf.acquire(_key(0), _build)
    shelf.acquire(_key(1), _build).release()
    assert shelf.stats()["idle"] == 0
    assert shelf.acquire(_key(0), _build).shared is held.shared
    assert shelf.stats() == {"in_use": 1, "idle": 0, "builds": 2, "reuses": 1}


def test_concurrent_acquires_of_one_key_build_once(builds: list[str]) -> None:
    shelf = TokenizerShelf()
    start = threading.Barrier(6)

    def acquire(_: int) -> object:
        start.wait()
        return shelf.acquire(_key(7), _build).shared

    with ThreadPoolExecutor(6) as pool:
        shared = list(pool.map(acquire, range(6)))
    assert len(builds) == 1
    assert all(s is shared[0] for s in shared)
    assert shelf.stats() == {"in_use": 1, "idle": 0, "builds": 1, "reuses": 5}


def test_a_failed_build_is_raised_and_the_next_acquire_builds(builds: list[str]) -> None:
    shelf = TokenizerShelf()

    def broken() -> Any:
        raise OSError("no tokenizer here")

    with pytest.raises(OSError, match="no tokenizer"):
        shelf.acquire(_key(1), broken)
    assert shelf.acquire(_key(1), _build).tokenizer is not None
    assert shelf.stats() == {"in_use": 1, "idle": 0, "builds": 1, "reuses": 0}
